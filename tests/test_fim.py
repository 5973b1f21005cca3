"""Fill-in-the-middle: the tokenizer's FIM tokens and prompt, the data transform, prepare's hook,
generate --suffix, /v1/completions with suffix (through the openai client) and the hidden-line
metric."""

import difflib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.data.fim import FIMOptions, encode_documents, split
from nanoseek.data.prepare import PrepareConfig, prepare
from nanoseek.data.shards import TokenShards
from nanoseek.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, FIM_TOKENS, SPECIAL_TOKENS, Tokenizer

CODE = '''def add(a, b):
    """Sum of two numbers."""
    total = a + b
    return total


def scale(xs, k):
    out = []
    for x in xs:
        out.append(x * k)
    return out
'''


def _code_docs(n=60, seed=0):
    rng = random.Random(seed)
    names = "alpha beta gamma delta count total index value item result".split()
    docs = []
    for i in range(n):
        a, b = rng.sample(names, 2)
        docs.append(f"def f{i}({a}, {b}):\n    {a} = {a} + {b}\n    return {a} * {rng.randrange(10)}\n")
    return docs


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([CODE] * 3 + _code_docs(), vocab_size=400)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


def test_fim_tokens_follow_the_fixed_specials(tok, tok_dir):
    assert [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == SPECIAL_TOKENS
    assert tok.fim_ids == (8, 9, 10)
    assert [tok.id_to_token(i) for i in tok.fim_ids] == FIM_TOKENS
    assert Tokenizer.load(tok_dir).fim_ids == (8, 9, 10)
    assert tok.encode(FIM_HOLE) == [9]  # a control id where specials are allowed …
    assert 9 not in tok.encode(FIM_HOLE, allow_special=False)  # … and text in raw corpora
    assert tok.decode(tok.encode(FIM_HOLE, allow_special=False)) == FIM_HOLE


def test_fim_prompt_psm_and_spm(tok):
    pre, suf = tok.encode("def f(x):\n"), tok.encode("    return y\n")
    assert tok.fim_prompt("def f(x):\n", "    return y\n") == [8, *pre, 9, *suf, 10]
    assert tok.fim_prompt("def f(x):\n", "    return y\n", spm=True) == [8, 9, *suf, 10, *pre]
    # typed FIM tags in the code are characters, never control ids
    ids = tok.fim_prompt(f"x = '{FIM_END}'\n", "")
    assert ids.count(10) == 1 and ids[-1] == 10


def test_tokenizer_without_fim_tokens_still_loads(tmp_path):
    """A vocabulary trained before the FIM tokens existed: only the fixed eight specials."""
    from tokenizers import models, pre_tokenizers, trainers

    from nanoseek.tokenizer import _build_backend

    backend = _build_backend()
    backend.train_from_iterator(["abc abc def"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    old = Tokenizer(backend)
    old.save(tmp_path)
    old = Tokenizer.load(tmp_path)
    assert old.fim_ids is None and old.decode(old.encode("abc def")) == "abc def"
    with pytest.raises(ValueError, match="has no FIM tokens"):
        old.fim_prompt("a", "b")
    with pytest.raises(ValueError, match="--fim-rate 0.5: the tokenizer .* has no FIM tokens"):
        prepare(PrepareConfig(data=str(tmp_path / "tokenizer.json"), tokenizer=str(tmp_path),
                              out=str(tmp_path / "o"), fim_rate=0.5, progress=False))


@pytest.mark.parametrize("level", ["char", "line"])
def test_split_covers_the_text(level):
    rng = random.Random(0)
    for _ in range(200):
        p, m, s = split(CODE, rng, level)
        assert p + m + s == CODE
        if level == "line":
            assert (not p or p.endswith("\n")) and (not m or m.endswith("\n"))


def test_encode_documents_rate_order_and_determinism(tok):
    docs = _code_docs(400)
    plain = encode_documents(tok, docs, FIMOptions(rate=0.0))
    assert plain == tok.encode_batch(docs, allow_special=False)
    opts = FIMOptions(rate=0.5, spm_rate=0.5, level="line", seed=3)
    out = encode_documents(tok, docs, opts)
    assert out == encode_documents(tok, docs[::-1], opts)[::-1]  # per document, not per position
    assert out != encode_documents(tok, docs, FIMOptions(0.5, 0.5, "line", seed=4))
    fim = [ids for ids in out if ids[0] == 8]
    assert 0.4 < len(fim) / len(docs) < 0.6
    for doc, ids in zip(docs, out):
        if ids[0] != 8:
            assert ids == tok.encode(doc, allow_special=False)
            continue
        assert sorted(i for i in ids if i in (8, 9, 10)) == [8, 9, 10]
        h, e = ids.index(9), ids.index(10)
        # PSM: begin prefix hole suffix end middle; SPM: begin hole suffix end prefix middle
        prefix, suffix, middle = tok.decode(ids[1:h]), tok.decode(ids[h + 1:e]), tok.decode(ids[e + 1:])
        assert prefix + middle + suffix == doc
    spm = encode_documents(tok, docs, FIMOptions(rate=0.5, spm_rate=1.0, level="char", seed=3))
    assert all(ids[:2] == [8, 9] for ids in spm if ids[0] == 8)
    psm = encode_documents(tok, docs, FIMOptions(rate=0.5, spm_rate=0.0, level="char", seed=3))
    assert sum(ids[:2] == [8, 9] for ids in psm) < 0.1 * len(fim)  # only where the cut left no prefix


def test_prepare_applies_fim_to_a_fraction(tok_dir, tmp_path):
    docs = _code_docs(200)
    src = tmp_path / "code.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    common = dict(data=str(src), tokenizer=str(tok_dir), progress=False, near_dedup=False, min_chars=1,
                  max_dup_line_fraction=None, max_dup_ngram_fraction=None, max_symbol_ratio=None,
                  min_alpha_ratio=None)
    with pytest.raises(ValueError, match="--fim-rate 1.5: must be in"):
        PrepareConfig(out=str(tmp_path / "x"), fim_rate=1.5, **common)
    rep = prepare(PrepareConfig(out=str(tmp_path / "fim"), fim_rate=0.5, fim_level="line", workers=2, **common))
    assert rep["docs_kept"] == 200
    ids = TokenShards(tmp_path / "fim")[:].tolist()
    n_fim = ids.count(8)
    assert ids.count(9) == ids.count(10) == n_fim and 70 <= n_fim <= 130
    # the same documents in-process give the same shards (the cut depends on the text alone)
    rep0 = prepare(PrepareConfig(out=str(tmp_path / "fim0"), fim_rate=0.5, fim_level="line", workers=0,
                                 **common))
    assert np.array_equal(TokenShards(tmp_path / "fim0")[:],
                          TokenShards(tmp_path / "fim")[:])


def test_long_documents_are_cut_into_pieces_each_fim_or_not(tok):
    from nanoseek.data.fim import pieces

    doc = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(40))
    parts = pieces(doc, 120)
    assert "".join(parts) == doc and all(len(p) <= 120 for p in parts) and len(parts) > 10
    assert pieces(doc, 0) == [doc] and pieces("x" * 300 + "\n", 120) == ["x" * 300 + "\n"]
    ids = encode_documents(tok, [doc], FIMOptions(rate=0.5, level="line", max_chars=120, seed=1))[0]
    n_fim = ids.count(8)
    assert 0 < n_fim < len(parts) and ids[-1] != tok.eos_id  # the shard writer adds the last one
    # every FIM piece ends its middle with <|eos|>; the text of all pieces is the document's
    docs, cur = [], []
    for i in ids + [tok.eos_id]:
        if i == tok.eos_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    text = ""
    for d in docs:
        if 8 in d:
            assert d[0] == 8
            h, e = d.index(9), d.index(10)
            text += tok.decode(d[1:h]) + tok.decode(d[e + 1:]) + tok.decode(d[h + 1:e])
        else:
            text += tok.decode(d)
    assert text == doc
    assert len(docs) >= n_fim


# ------------------------------------------------------------------ a scripted FIM model
HIDDEN = "\treturn x"  # a tab: every token of the answer is distinct, so each names the next


def _scripted_fim_checkpoint(path, scale: float = 12.0):
    """A tiny real checkpoint whose greedy continuation of <｜fim▁end｜> is HIDDEN + "\\n" then
    <|eos|>: chain tokens get orthonormal embeddings and each one's head row points at the next
    (as nanoseek.serve.testing's scripted model)."""
    import torch

    from nanoseek.checkpoint import save_pretrained
    from nanoseek.config import preset
    from nanoseek.model import DeepSeekV3

    tok = Tokenizer.train([CODE.replace("    ", "\t")] * 5 + _code_docs(), vocab_size=400)
    answer = tok.encode(HIDDEN + "\n", allow_special=False)
    chain = [tok.fim_ids[2], *answer, tok.eos_id]
    assert len(set(chain)) == len(chain)
    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny", vocab_size=tok.vocab_size)).float()
    d = model.config.hidden_size
    with torch.no_grad():
        emb = torch.randn(tok.vocab_size, d)
        emb = emb / emb.norm(dim=1, keepdim=True)
        emb[chain] = torch.linalg.qr(torch.randn(d, d))[0][: len(chain)]
        model.embed_tokens.weight.copy_(emb)
        head = torch.zeros(tok.vocab_size, d)
        for a, b in zip(chain[:-1], chain[1:]):
            head[b] = scale / d**0.5 * emb[a]
        model.lm_head.weight.copy_(head)
    save_pretrained(model, path, extra={"tokenizer": tok.save})
    return path


@pytest.fixture(scope="module")
def fim_ckpt(tmp_path_factory):
    return _scripted_fim_checkpoint(tmp_path_factory.mktemp("fim") / "scripted")


@pytest.fixture(scope="module")
def old_ckpt(tmp_path_factory):
    """A checkpoint whose tokenizer predates the FIM tokens."""
    import torch
    from tokenizers import pre_tokenizers, trainers

    from nanoseek.checkpoint import save_pretrained
    from nanoseek.config import preset
    from nanoseek.model import DeepSeekV3
    from nanoseek.tokenizer import _build_backend

    backend = _build_backend()
    backend.train_from_iterator([CODE] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    old = Tokenizer(backend)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("old") / "old"
    save_pretrained(DeepSeekV3(preset("tiny", vocab_size=old.vocab_size)), path, extra={"tokenizer": old.save})
    return path


def test_generate_suffix_fills_the_middle(fim_ckpt, old_ckpt, capsys):
    from nanoseek.cli import main
    from nanoseek.engine.chat import GenerateConfig, generate_cmd

    answer = generate_cmd(GenerateConfig(ckpt=str(fim_ckpt), prompt="def f(x):\n", suffix="\n\nprint(f(1))\n",
                                         temperature=0, max_tokens=16))
    assert answer == HIDDEN + "\n"
    assert capsys.readouterr().out == "def f(x):\n" + HIDDEN + "\n" + "\n\nprint(f(1))\n" + "\n"
    assert main(["generate", "--ckpt", str(old_ckpt), "--prompt", "def f(x):\n", "--suffix", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--suffix: this tokenizer has no FIM tokens" in err[0]


def test_completions_suffix_through_openai_client(fim_ckpt, old_ckpt):
    openai = pytest.importorskip("openai")
    from nanoseek.engine import Engine
    from nanoseek.serve import ServeConfig, create_app
    from nanoseek.serve.testing import ServerThread

    tok = Tokenizer.load(fim_ckpt)
    engine = Engine(str(fim_ckpt), device="cpu", block_size=16, max_num_seqs=4)
    seen = []
    add = engine.add_request
    engine.add_request = lambda ids, *a, **k: seen.append(list(ids)) or add(ids, *a, **k)
    app = create_app(engine, ServeConfig(ckpt=str(fim_ckpt), api_key=["sk-fim-0123456789"]))
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-fim-0123456789", max_retries=0, timeout=60)
        r = client.completions.create(model="nanoseek", prompt="def f(x):\n", suffix="\nprint(f(2))\n",
                                      temperature=0, max_tokens=16)
        assert seen == [tok.fim_prompt("def f(x):\n", "\nprint(f(2))\n", add_bos=True)]
        assert r.choices[0].text == HIDDEN + "\n" and r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens == len(seen[0]) and r.usage.completion_tokens == len(tok.encode(HIDDEN)) + 2
        with pytest.raises(openai.BadRequestError, match="suffix takes the prompt as text"):
            client.completions.create(model="nanoseek", prompt=[1, 2, 3], suffix="x", max_tokens=4)
    old_app = create_app(Engine(str(old_ckpt), device="cpu", block_size=16, max_num_seqs=2),
                         ServeConfig(ckpt=str(old_ckpt), api_key=["sk-fim-0123456789"]))
    with ServerThread(old_app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-fim-0123456789", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="nanoseek", prompt="def f(x):\n", suffix="x", max_tokens=4)
        assert e.value.status_code == 400 and "tokenizer has none" in e.value.message
        assert e.value.body["param"] == "suffix"


HELD_OUT = '''def f(x):
\treturn x


def g(x, y):
\treturn x + y


class K:
\tdef m(self, x):
\t\t"""A docstring is never the hidden line."""
\t\treturn x


def h(x):
\treturn x
'''


def test_hidden_lines_are_one_line_statements_of_a_function_body():
    from nanoseek.eval.fim import answer, holes

    found = holes([HELD_OUT, "def broken(:\n", CODE], n=100, seed=0)
    by_name = {h.source.split(":")[1]: h for h in found}
    assert sorted(by_name) == ["add", "f", "g", "h", "m", "scale"]  # the file that does not parse is skipped
    assert by_name["g"].prefix == "def g(x, y):\n" and by_name["g"].line == "\treturn x + y"
    assert by_name["g"].suffix == ""
    assert by_name["m"].prefix.startswith("\tdef m(self, x):\n\t\t\"\"\"") and by_name["m"].line == "\t\treturn x"
    add = by_name["add"]
    assert add.line in ("    total = a + b", "    return total")
    assert add.prefix + add.line + "\n" + add.suffix == CODE[:CODE.index("\n\n\ndef scale")] + "\n"
    assert holes([CODE] * 3, n=2, seed=0) == holes([CODE] * 3, n=2, seed=0) and len(holes([CODE], 1)) == 1
    assert answer("\tx = 1\nmore", "fim") == "\tx = 1"
    assert answer("\n\tx = 1\nmore", "prefix") == "\tx = 1" and answer("x", "prefix") is None


def test_eval_fim_task_reports_exact_match_both_ways(fim_ckpt, old_ckpt, tmp_path, capsys):
    from nanoseek.cli import main

    src = tmp_path / "held_out.py"
    src.write_text(HELD_OUT)
    out = tmp_path / "fim.json"
    assert main(["eval", "--ckpt", str(fim_ckpt), "--task", "fim", "--data", str(src), "--max-tokens", "12",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    # the scripted model answers "\treturn x" to every hole: f, h and m's hole is that line (m's with
    # two tabs, so a miss), g's is not
    assert res["n"] == 4 and res["fim_exact_match"] == 0.5
    # the misses: "\t\treturn x" (m) and "\treturn x + y" (g) against "\treturn x"
    sim = [difflib.SequenceMatcher(None, HIDDEN, line).ratio() for line in ("\t\treturn x", "\treturn x + y")]
    assert res["fim_edit_similarity"] == pytest.approx((2 + sum(sim)) / 4)
    assert {s["fim"] for s in res["samples"]} == {HIDDEN}
    assert res["prefix_exact_match"] == 0.0
    assert main(["eval", "--ckpt", str(old_ckpt), "--task", "fim", "--data", str(src), "--max-tokens", "4",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "fim_exact_match" not in res and res["prefix_exact_match"] == 0.0 and res["n"] == 4
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(fim_ckpt), "--task", "fim"]) == 2
    assert "--task fim: needs --data" in capsys.readouterr().err
