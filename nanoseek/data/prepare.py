"""`nanoseek data prepare`: documents -> clean documents -> token shards.

One streaming pass: each document is normalised, checked by the quality rules
of its profile (prose or code, see `clean`), by the exact and the near-duplicate
index, and, when it survives, sent to a worker pool to be tokenized and appended
to the shards; a rejected one is a line of rejected.jsonl (its source and rule).
Nothing but hashes and MinHash band tables is kept per document, so the corpus
never sits in memory.

Then the documents are put in a seeded random order (`shards.reorder`): folders
and globs are read in sorted order, and training reads consecutive windows, so
without it a run that stops early has seen only the alphabetically first part of
the corpus. A seeded random `--val-fraction` of the documents goes last and is the
validation set (index.json's val_docs): held out by document, never the tail of
one package.

Curation runs in the main process because deduplication is sequential by
nature (whether a document is a duplicate depends on all earlier ones);
tokenization is the parallel part. Work goes to the pool in chunks, at most a
few chunks per worker in flight: ``Pool.imap`` would read the whole input
ahead into its task queue, which is exactly the unbounded memory we avoid.

Output goes to ``<out>.tmp-<pid>`` and is renamed to ``out`` at the end, so an
interrupted run never leaves a half-written shard directory behind.
"""

from __future__ import annotations

import heapq
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, fields
from itertools import chain, islice
from pathlib import Path

from tqdm import tqdm

from nanoseek.data.clean import (NORMAL_FORMS, PROFILES, QualityConfig, build_rules, dedup_key, first_failed_rule,
                                 normalize)
from nanoseek.data.dedup import ExactDedup, NearDedup
from nanoseek.data.fim import LEVELS as FIM_LEVELS, FIMOptions, encode_documents
from nanoseek.data.shards import ShardWriter, reorder
from nanoseek.data.sources import iter_records

TOP_REJECTED = 5  # sources named per rule in the report (the largest documents it removed)


@dataclass
class PrepareConfig:
    """`nanoseek data prepare`: clean, deduplicate and tokenize a corpus."""

    data: str = field(metadata={"help": "a text/code (.txt, .py, …), .jsonl or .parquet file, a folder, a glob, "
                                        "builtin:NAME[?n=&seed=] or hf:NAME[:CONFIG][?split=]"})
    tokenizer: str = field(metadata={"help": "tokenizer directory (tokenizer.json), e.g. from `nanoseek tokenizer train`"})
    out: str = field(metadata={"help": "output directory: token shards, index.json, report.json, config.json, "
                                       "clean.jsonl, rejected.jsonl"})
    text_field: str = field(default="text", metadata={"help": "jsonl/parquet column holding the text"})
    max_docs: int | None = field(default=None, metadata={"help": "read at most this many input documents"})
    normalize: str = field(default="NFC", metadata={"help": "Unicode normal form: NFC | NFKC | none"})
    strict_files: bool = field(default=False, metadata={"help": "stop at a file that cannot be read (not UTF-8, "
                                                        "corrupt) instead of skipping it and naming it in the report"})
    profile: str = field(default="prose", metadata={"help": "quality rules for prose (symbol, repetition) or code "
                                                    "(line length, generated, licence, data tables)",
                                                    "choices": list(PROFILES)})
    # quality rules (None switches a rule off; see nanoseek.data.clean)
    min_chars: int | None = field(default=QualityConfig.min_chars, metadata={"help": "drop shorter documents"})
    max_chars: int | None = field(default=QualityConfig.max_chars, metadata={"help": "drop longer documents"})
    min_alpha_ratio: float | None = field(default=QualityConfig.min_alpha_ratio, metadata={
        "help": "drop documents whose share of letters and digits is below this"})
    max_symbol_ratio: float | None = field(default=QualityConfig.max_symbol_ratio, metadata={
        "help": "drop documents whose share of words with no letter or digit is above this"})
    max_dup_line_fraction: float | None = field(default=QualityConfig.max_dup_line_fraction, metadata={
        "help": "drop documents with more repeated lines than this fraction"})
    max_dup_ngram_fraction: float | None = field(default=QualityConfig.max_dup_ngram_fraction, metadata={
        "help": "drop documents with more repeated word n-grams than this fraction"})
    max_line_length: int | None = field(default=QualityConfig.max_line_length, metadata={
        "help": "code: drop documents with a longer line (minified, blobs)"})
    max_mean_line_length: float | None = field(default=QualityConfig.max_mean_line_length, metadata={
        "help": "code: drop documents whose mean line is longer"})
    auto_generated: bool = field(default=QualityConfig.auto_generated, metadata={
        "help": "code: drop documents whose header says DO NOT EDIT / @generated"})
    max_license_fraction: float | None = field(default=QualityConfig.max_license_fraction, metadata={
        "help": "code: drop documents whose leading licence comment is more than this share of the lines"})
    max_data_line_fraction: float | None = field(default=QualityConfig.max_data_line_fraction, metadata={
        "help": "code: drop documents with more lines of bare literals (data tables) than this share"})
    exact_dedup: bool = field(default=True, metadata={"help": "drop exact duplicates (after normalisation)"})
    near_dedup: bool = field(default=True, metadata={"help": "drop near-duplicates (MinHash LSH)"})
    near_dup_threshold: float = field(default=0.8, metadata={"help": "estimated Jaccard of word shingles at which "
                                                             "a document is a near-duplicate"})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations"})
    shingle_words: int = field(default=5, metadata={"help": "words per shingle"})
    fim_rate: float = field(default=0.0, metadata={"help": "share of documents rearranged for fill-in-the-middle "
                                                  "(DeepSeek-Coder: 0.5 on code; 0 for prose)"})
    fim_spm_rate: float = field(default=0.5, metadata={"help": "share of the FIM documents in SPM order (else PSM)"})
    fim_level: str = field(default="char", metadata={"help": "where FIM cuts: char | line", "choices": list(FIM_LEVELS)})
    fim_max_chars: int = field(default=0, metadata={"help": "FIM cuts longer documents at line breaks into pieces of "
                                                    "at most this many characters first (fit the training "
                                                    "window); 0 = whole documents"})
    workers: int = field(default=2, metadata={"help": "tokenizer processes; 0 tokenizes in this process"})
    chunk_docs: int = field(default=256, metadata={"help": "documents per task sent to a worker"})
    shard_tokens: int = field(default=1 << 26, metadata={"help": "start a new shard beyond this many tokens"})
    shuffle: bool = field(default=True, metadata={"help": "put the training documents in a seeded random order"})
    val_fraction: float = field(default=0.01, metadata={"help": "share of the documents (seeded, random) held out "
                                                        "as validation, at the end of the stream"})
    seed: int = field(default=0, metadata={"help": "seeds the document order, the validation choice and "
                                                    "the FIM cuts"})
    write_clean: bool = field(default=True, metadata={"help": "also write the kept documents to clean.jsonl "
                                                      "(in input order)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing, non-empty --out directory"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar and print the report"})

    def __post_init__(self) -> None:
        """Bad values are one line naming the flag and its range, before anything is read."""
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: {msg}")

        forms = ", ".join(NORMAL_FORMS)
        if self.normalize not in NORMAL_FORMS:
            raise ValueError(f"--normalize {self.normalize!r}: expected one of {forms}")
        need(self.max_docs is None or self.max_docs >= 1, "max_docs", "must be ≥ 1")
        for name in ("min_chars", "max_chars"):
            need(getattr(self, name) is None or getattr(self, name) >= 0, name, "must be ≥ 0")
        for name in ("min_alpha_ratio", "max_symbol_ratio", "max_dup_line_fraction", "max_dup_ngram_fraction",
                     "max_license_fraction", "max_data_line_fraction"):
            need(getattr(self, name) is None or 0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")
        for name in ("max_line_length", "max_mean_line_length"):
            need(getattr(self, name) is None or getattr(self, name) >= 1, name, "must be ≥ 1")
        if self.profile not in PROFILES:
            raise ValueError(f"--profile {self.profile!r}: expected one of {', '.join(PROFILES)}")
        need(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        need(0 <= self.near_dup_threshold <= 1, "near_dup_threshold", "must be in [0, 1]")
        for name in ("num_perm", "shingle_words", "chunk_docs", "shard_tokens"):
            need(getattr(self, name) >= 1, name, "must be ≥ 1")
        need(self.workers >= 0, "workers", "must be ≥ 0 (0 = tokenize in this process)")
        if not self.text_field:
            raise ValueError("--text-field: must be a non-empty column name")
        self.fim().check()
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise FileExistsError(f"--out {self.out}: is a file; the shards are written into a directory")
        tok = Path(self.tokenizer)
        if not (tok / "tokenizer.json").is_file() and not (tok.is_file() and tok.suffix == ".json"):
            what = "no such directory" if not tok.exists() else f"no tokenizer.json in {tok}"
            raise FileNotFoundError(f"--tokenizer {self.tokenizer}: {what} (train one with `nanoseek tokenizer train`)")

    def quality(self) -> QualityConfig:
        """The quality thresholds as the filters take them (flat here for the CLI)."""
        return QualityConfig(**{f.name: getattr(self, f.name) for f in fields(QualityConfig)
                                if hasattr(self, f.name)})

    def fim(self) -> FIMOptions:
        return FIMOptions(self.fim_rate, self.fim_spm_rate, self.fim_level, self.fim_max_chars, self.seed)


# --------------------------------------------------------------- workers
_WORKER_TOK = None
_WORKER_FIM: FIMOptions | None = None


def _init_worker(tokenizer_dir: str, fim: FIMOptions):
    global _WORKER_TOK, _WORKER_FIM
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # we are the parallelism
    from nanoseek.tokenizer import Tokenizer

    _WORKER_TOK, _WORKER_FIM = Tokenizer.load(tokenizer_dir), fim


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    # a literal "<|eos|>" in a document is text, not a document boundary; --fim-rate of them FIM
    return encode_documents(_WORKER_TOK, texts, _WORKER_FIM)


def _tokenized(chunks, cfg: PrepareConfig):
    """Yield token lists for the chunks' documents, in order, bounded in flight."""
    if cfg.workers <= 0:
        _init_worker(cfg.tokenizer, cfg.fim())
        for chunk in chunks:
            yield from _encode_chunk(chunk)
        return
    with mp.get_context().Pool(cfg.workers, initializer=_init_worker, initargs=(cfg.tokenizer, cfg.fim())) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            while len(pending) > 2 * cfg.workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# --------------------------------------------------------------- curation
class _Curator:
    """Applies normalisation, rules and dedup; counts what each one removes."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.rules = build_rules(cfg.quality())
        self.exact = ExactDedup() if cfg.exact_dedup else None
        self.near = NearDedup(cfg.near_dup_threshold, cfg.num_perm, cfg.shingle_words) if cfg.near_dedup else None
        self.removed_docs: Counter = Counter()
        self.removed_chars: Counter = Counter()
        self.top: dict[str, list[tuple[int, str]]] = {}  # rule -> (chars, source) of its largest removals
        self.docs_in = self.chars_in = self.docs_kept = self.chars_kept = 0

    def verdict(self, raw: str) -> tuple[str | None, str]:
        """(name of the rule that removes the document or None, normalised text)."""
        text = normalize(raw, self.cfg.normalize)
        if not text:
            return "empty", text
        rule = first_failed_rule(text, self.rules)
        if rule:
            return rule, text
        if self.exact is not None and self.exact.seen(dedup_key(text)):
            return "exact_dup", text
        if self.near is not None and self.near.seen(text):
            return "near_dup", text
        return None, text

    def __call__(self, records, bar, rejected):
        """Yield the kept texts of (source, text) records; write one line per removal to ``rejected``."""
        for source, raw in records:
            self.docs_in += 1
            self.chars_in += len(raw)
            rule, text = self.verdict(raw)
            bar.update(1)
            if rule:
                self.removed_docs[rule] += 1
                self.removed_chars[rule] += len(raw)
                rejected.write(json.dumps({"source": source, "rule": rule, "chars": len(raw)},
                                          ensure_ascii=False) + "\n")
                top = self.top.setdefault(rule, [])
                heapq.heappush(top, (len(raw), source))
                if len(top) > TOP_REJECTED:
                    heapq.heappop(top)
                continue
            self.docs_kept += 1
            self.chars_kept += len(text)
            yield text


def _chunks(it, n):
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk


def _check_out(out: Path, overwrite: bool):
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} already exists and is not empty (use overwrite to replace it)")


def prepare(cfg: PrepareConfig) -> dict:
    """Run curation + tokenization; write shards and report.json; return the report."""
    from nanoseek.tokenizer import Tokenizer

    out = Path(cfg.out)
    _check_out(out, cfg.overwrite)
    if cfg.chunk_docs <= 0:
        raise ValueError(f"chunk_docs must be positive, got {cfg.chunk_docs}")
    tok = Tokenizer.load(cfg.tokenizer)  # fail early on a bad tokenizer dir
    cfg.fim().check(tok, cfg.tokenizer)
    skipped: list[tuple[str, str]] = []
    docs = iter_records(cfg.data, text_field=cfg.text_field, skipped=skipped, strict=cfg.strict_files)
    if cfg.max_docs is not None:
        docs = islice(docs, cfg.max_docs)
    # read the first document now: a file that cannot be read at all (not UTF-8, not JSON) is
    # then one error line, before the progress bar and the output directory exist
    first = next(docs, None)
    docs = chain([] if first is None else [first], docs)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writer = ShardWriter(tmp / "input-order", tok.vocab_size, tok.eos_id, cfg.shard_tokens)
        curator = _Curator(cfg)
        clean_f = open(tmp / "clean.jsonl", "w", encoding="utf-8") if cfg.write_clean else None
        rejected_f = open(tmp / "rejected.jsonl", "w", encoding="utf-8")
        bar = tqdm(desc="prepare", unit="doc", disable=not cfg.progress, file=sys.stderr)

        def kept():  # tee the kept texts into clean.jsonl as they pass
            for text in curator(docs, bar, rejected_f):
                if clean_f:
                    clean_f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                yield text

        tokens = 0
        for ids in _tokenized(_chunks(kept(), cfg.chunk_docs), cfg):
            tokens += writer.add(ids)
            bar.set_postfix(kept=curator.docs_kept, tokens=tokens, refresh=False)
        bar.close()
        if clean_f:
            clean_f.close()
        rejected_f.close()
        writer.close()
        index = reorder(tmp / "input-order", tmp, cfg.val_fraction, cfg.seed, cfg.shuffle, cfg.shard_tokens)
        shutil.rmtree(tmp / "input-order")
        report = _report(cfg, curator, index, skipped)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if cfg.progress:
        print(format_report(report))
    return report


# ------------------------------------------------------------------ report
def _report(cfg: PrepareConfig, c: _Curator, index: dict, skipped: list[tuple[str, str]]) -> dict:
    order = ["empty"] + [name for name, _ in c.rules] + ["exact_dup", "near_dup"]
    return {
        "data": cfg.data,
        "profile": cfg.profile,
        "files_skipped": [{"path": p, "why": why} for p, why in skipped],
        "docs_in": c.docs_in,
        "chars_in": c.chars_in,
        "removed": {r: {"docs": c.removed_docs[r], "chars": c.removed_chars[r],
                        "largest": [src for _, src in sorted(c.top.get(r, []), reverse=True)]} for r in order},
        "docs_removed": sum(c.removed_docs.values()),
        "docs_kept": c.docs_kept,
        "chars_kept": c.chars_kept,
        "tokens": index["num_tokens"],  # including one <|eos|> per document
        "shards": len(index["shards"]),
        "dtype": index["dtype"],
        "val_docs": index["val_docs"],
        "shuffled": index["shuffled"],
    }


def format_report(report: dict) -> str:
    """The report as a plain-text table, one row per rule."""
    rows = [("rule", "docs", "chars")]
    rows.append(("input", str(report["docs_in"]), str(report["chars_in"])))
    for rule, r in report["removed"].items():
        rows.append((f"- {rule}", str(r["docs"]), str(r["chars"])))
    rows.append(("kept", str(report["docs_kept"]), str(report["chars_kept"])))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"tokens: {report['tokens']} in {report['shards']} shard(s) of {report['dtype']}; "
                 f"the last {report['val_docs']} document(s) are validation; "
                 + ("shuffled" if report["shuffled"] else "training documents in input order"))
    for rule, r in report["removed"].items():
        if r["largest"]:
            lines.append(f"largest removed by {rule}: {', '.join(r['largest'])}")
    skipped = report["files_skipped"]
    if skipped:
        named = "; ".join(f"{s['path']} ({s['why']})" for s in skipped[:10])
        lines.append(f"{len(skipped)} file(s) skipped: {named}" + (" …" if len(skipped) > 10 else ""))
    return "\n".join(lines)
