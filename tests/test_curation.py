"""Curation: planted junk and duplicates are counted per rule; clean text survives into shards."""

import json
import random
import unicodedata

import numpy as np
import pytest

from nanoseek.data.clean import (QualityConfig, alpha_ratio, build_rules, dup_line_fraction,
                                 dup_ngram_fraction, first_failed_rule, normalize, symbol_ratio)
from nanoseek.data.dedup import ExactDedup, NearDedup, band_layout
from nanoseek.data.prepare import PrepareConfig, format_report, prepare
from nanoseek.data.shards import ShardWriter, TokenShards, token_dtype
from nanoseek.tokenizer import Tokenizer

N_CLEAN = 40


def _vocab(rng, n=400):
    letters = "abcdefghijklmnoprstuvw"
    words = {"".join(rng.choice(letters) for _ in range(rng.randrange(3, 9))) for _ in range(n)}
    return sorted(words) + ["café", "naïve", "42", "1984"]


def _clean_doc(rng, vocab):
    """~200 random words in 8 lines: passes every rule, shares no 5-gram with others."""
    lines = [" ".join(rng.choice(vocab) for _ in range(25)) + "." for _ in range(8)]
    return "\n".join(lines)


def _near_copy(rng, doc, vocab, n_changes=2):
    words = doc.split(" ")
    for i in rng.sample(range(len(words)), n_changes):
        words[i] = "zz" + rng.choice(vocab)
    return " ".join(words)


JUNK = {
    "empty": ["   \n\t "],
    "too_short": ["hi there", "ok", "a short line."],
    "symbol_ratio": ["#### @@@@ $$$$ %%%% ^^^^ &&&& **** !!!!", "-- == ++ -- == ++ -- == ++ ok"],
    "alpha_ratio": ["a!!!!!!!!! b?????????? c.......... d;;;;;;;;;", "x$$$$$$$$ y%%%%%%%%%% z&&&&&&&&&"],
    "repeated_lines": ["buy cheap pills now\n" * 6 + "final words here", "click here\nclick here\nclick here\nok then"],
    "repeated_ngrams": ["the best deal of the year " * 8, "win win win win win win win win win win win win win"],
}


@pytest.fixture(scope="module")
def corpus():
    """(documents in input order, the clean documents in order, planted counts per rule)."""
    rng = random.Random(7)
    vocab = _vocab(rng)
    clean = [_clean_doc(rng, vocab) for _ in range(N_CLEAN)]
    docs = list(clean)
    planted = {rule: len(items) for rule, items in JUNK.items()}
    exact = [clean[0].upper(), clean[1].replace(" ", "   "), clean[2] + "\n\n", clean[3],
             unicodedata.normalize("NFD", clean[4] + " café")]
    clean[4] += " café"  # the NFD copy's NFC original is a clean doc too
    docs[4] = clean[4]
    clean[5] += " a literal <|eos|> is text"  # must not become a document boundary
    docs[5] = clean[5]
    near = [_near_copy(rng, clean[i], vocab) for i in range(10, 15)]
    planted["exact_dup"], planted["near_dup"] = len(exact), len(near)
    for item in exact + near + [j for items in JUNK.values() for j in items]:
        # insert after position 15, so every copy comes after its original
        docs.insert(rng.randrange(16, len(docs) + 1), item)
    return docs, clean, planted


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    Tokenizer.train(corpus[1], vocab_size=320).save(d)
    return d


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")


@pytest.fixture(scope="module")
def prepared(corpus, tok_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    _write_jsonl(root / "in.jsonl", corpus[0])
    cfg = PrepareConfig(data=str(root / "in.jsonl"), tokenizer=str(tok_dir), out=str(root / "out"),
                        workers=2, chunk_docs=3, shard_tokens=3000, progress=False, shuffle=False, val_fraction=0.0)
    return cfg, prepare(cfg)


# ------------------------------------------------------------------ rules
def test_rule_measures():
    assert alpha_ratio("ab!!") == 0.5
    assert alpha_ratio("12+34=46") == 0.75  # digits count: arithmetic is good text
    assert symbol_ratio("(3+5)*7 = 56") == pytest.approx(1 / 3)  # only "=" has no alnum
    assert dup_line_fraction("a\nb\na\na") == 0.5
    assert dup_line_fraction("a\na") == 0.0  # too few lines to judge
    assert dup_ngram_fraction("x y z " * 6) == pytest.approx(13 / 16)  # 16 trigrams, 3 distinct
    assert dup_ngram_fraction("x y z x y z") == 0.0  # fewer than 12 words
    assert normalize("  Cafe\u0301 \r\nline  \n\n") == "Café\nline"
    assert normalize("１２ﬁ", "NFKC") == "12fi"
    with pytest.raises(ValueError, match="normalize form"):
        normalize("x", "NFX")


def test_rules_can_be_switched_off_and_order_is_fixed():
    rules = build_rules(QualityConfig())
    assert [n for n, _ in rules] == ["too_short", "too_long", "symbol_ratio", "alpha_ratio",
                                     "repeated_lines", "repeated_ngrams"]
    assert first_failed_rule("ok", rules) == "too_short"
    assert first_failed_rule("ok", build_rules(QualityConfig(min_chars=None))) is None
    assert first_failed_rule("Q: 37+45\nA: 7+5=12 carry 1. 3+4+1=8. 37+45=82.\n#### 82", rules) is None


def test_dedup_indexes():
    ex = ExactDedup()
    assert [ex.seen(k) for k in ["a", "b", "a"]] == [False, False, True] and len(ex) == 2
    rng = random.Random(1)
    vocab = _vocab(rng)
    doc = _clean_doc(rng, vocab)
    near = NearDedup(threshold=0.8)
    assert near.seen(doc) is False
    assert near.seen(_near_copy(rng, doc, vocab, 2)) is True
    assert near.seen(_clean_doc(rng, vocab)) is False
    with pytest.raises(ValueError, match="threshold"):
        NearDedup(threshold=1.5)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9, 0.95])
def test_band_layout_never_misses_a_duplicate(threshold):
    # more bands than allowed mismatches: a pair within threshold always shares a band
    bands, rows = band_layout(threshold, 128)
    assert bands * rows <= 128 and bands > int((1 - threshold) * 128)


# --------------------------------------------------------------- prepare
def test_report_counts_exactly_what_was_planted(prepared, corpus):
    cfg, report = prepared
    docs, clean, planted = corpus
    removed = {rule: r["docs"] for rule, r in report["removed"].items() if r["docs"]}
    assert removed == planted
    assert report["docs_in"] == len(docs)
    assert report["docs_kept"] == N_CLEAN
    assert report["docs_removed"] == sum(planted.values())
    assert report["removed"]["too_long"] == {"docs": 0, "chars": 0, "largest": []}
    assert report["removed"]["too_short"]["chars"] == sum(len(t) for t in JUNK["too_short"])
    on_disk = json.loads((TokenShards(cfg.out).dir / "report.json").read_text())
    assert on_disk == report
    table = format_report(report)
    assert "- near_dup" in table and f"kept" in table and str(N_CLEAN) in table


def test_shards_decode_to_kept_documents(prepared, corpus, tok_dir):
    cfg, report = prepared
    clean = corpus[1]
    tok = Tokenizer.load(tok_dir)
    shards = TokenShards(cfg.out)
    assert shards.dtype == np.uint16
    assert len(shards.shards) == report["shards"] > 1  # small shard_tokens forces several
    assert len(shards) == report["tokens"] == sum(len(tok.encode(t, allow_special=False)) + 1 for t in clean)
    assert int(np.sum(shards[:] == tok.eos_id)) == N_CLEAN  # eos only at document ends
    assert len(shards.doc_starts) == N_CLEAN and shards.doc_starts[0] == 0
    for i, text in enumerate(clean):
        ids = shards.document(i)
        assert ids[-1] == tok.eos_id
        assert tok.decode(ids) == text + "<|eos|>"
    # a slice across a shard border equals the concatenation of the shards
    border = int(shards.offsets[1])
    whole = np.concatenate([np.asarray(s) for s in shards.shards])
    assert np.array_equal(shards.tokens[border - 5:border + 5], whole[border - 5:border + 5])
    assert shards[border] == whole[border] and shards[-1] == tok.eos_id
    kept = [json.loads(line)["text"] for line in open(f"{cfg.out}/clean.jsonl", encoding="utf-8")]
    assert kept == clean


def test_in_process_tokenization_gives_same_shards(prepared, tmp_path):
    cfg, _ = prepared
    from dataclasses import replace
    out = tmp_path / "out0"
    prepare(replace(cfg, out=str(out), workers=0, shard_tokens=1 << 20, write_clean=False))
    a, b = TokenShards(cfg.out), TokenShards(out)
    assert len(b.shards) == 1 and np.array_equal(a[:len(a)], b[:len(b)])
    assert np.array_equal(a.doc_starts, b.doc_starts)
    assert not (out / "clean.jsonl").exists()


def test_out_dir_is_not_clobbered(prepared, tmp_path):
    cfg, _ = prepared
    from dataclasses import replace
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="busy.*not empty"):
        prepare(replace(cfg, out=str(out)))
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="nope.jsonl"):
        prepare(replace(cfg, data=str(tmp_path / "nope.jsonl"), out=str(tmp_path / "o2")))
    assert not (tmp_path / "o2").exists()


# ----------------------------------------------------------------- shards
def test_dtype_choice():
    assert token_dtype(320) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(129280) == np.uint32  # DeepSeek-V3's vocabulary


def test_shard_writer_reader_uint32(tmp_path):
    w = ShardWriter(tmp_path, vocab_size=100_000, eos_id=1, shard_tokens=5)
    for doc in ([70000, 5], [9, 9, 9, 9, 9], [99_999]):
        w.add(doc)
    index = w.close()
    assert index["dtype"] == "uint32" and [s["tokens"] for s in index["shards"]] == [3, 6, 2]
    ts = TokenShards(tmp_path)
    assert ts[:].tolist() == [70000, 5, 1, 9, 9, 9, 9, 9, 1, 99_999, 1]
    assert ts.doc_starts.tolist() == [0, 3, 9]
    assert ts.document(1).tolist() == [9, 9, 9, 9, 9, 1]


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        TokenShards(tmp_path)
    w = ShardWriter(tmp_path, vocab_size=300, eos_id=1)
    w.add([5, 6, 7])
    w.close()
    (tmp_path / "shard_00000.bin").write_bytes(b"\x00\x01\x02")  # truncated
    with pytest.raises(ValueError, match=r"shard_00000\.bin has 3 bytes"):
        TokenShards(tmp_path)
    (tmp_path / "shard_00000.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard_00000\.bin"):
        TokenShards(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"corrupt token shard index .*index\.json"):
        TokenShards(tmp_path)
