"""Batches of (input_ids, targets) for language-model training, with a resumable position.

The training stream is one long token sequence: documents, each closed by ``<|eos|>``, end to
end (the layout `nanoseek data prepare` writes into token shards). It comes either from a shard
directory (memory-mapped, so a corpus larger than RAM works) or from a built-in synthetic corpus
(``builtin:arith``) generated from its seed and tokenized when the loader is built: nothing to
prepare, and the same seed always gives the same tokens, which is what makes a resume exact.

Why sequential windows rather than random ones: the position is then a single integer, a resume
continues at exactly the next token, and every token is seen once per epoch. Step s of the global
batch covers rows [0, global_batch) of the window starting at `position`; rank r reads rows
[r·B_local, (r+1)·B_local) of it. One process with batch 8 and two processes with batch 4 each
therefore see the same 8 sequences in the same step — the property the DDP parity test checks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.shards import TokenShards
from ..data.sources import FILE_CORPORA, parse_builtin

BUILTIN_DEFAULT_DOCS = 20_000  # ≈ 6M tokens of builtin:arith: more than a CPU demo run sees
VAL_SEED_OFFSET = 1_000_003  # the validation stream of a builtin corpus uses another seed


def builtin_tokens(name: str, n_docs: int, seed: int, tokenizer, knobs: dict | None = None) -> np.ndarray:
    """Generate `n_docs` documents of a built-in corpus and tokenize them, each closed by eos.

    Raw text is encoded with allow_special=False: a literal "<|eos|>" in data must not forge a
    document boundary (the same rule `data prepare` follows).
    """
    from ..tasks import builtin_corpus

    docs = list(builtin_corpus(name, n_docs, seed, **(knobs or {})))
    ids = tokenizer.encode_batch(docs, allow_special=False)
    eos = tokenizer.eos_id
    flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
    return flat


class TokenStream:
    """A flat, indexable token sequence: a TokenShards view or an in-memory array."""

    def __init__(self, tokens, vocab_size: int | None = None, shuffled: bool = True):
        self.tokens = tokens
        self.vocab_size = vocab_size
        self.shuffled = shuffled  # documents in a random order (a built-in corpus is generated so)

    def __len__(self) -> int:
        return len(self.tokens)

    def window(self, start: int, n: int) -> np.ndarray:
        """n tokens from `start`, wrapping around the end of the stream (the next epoch)."""
        L = len(self.tokens)
        start %= L
        if start + n <= L:
            return np.asarray(self.tokens[start:start + n], dtype=np.int64)
        parts, got = [], 0
        while got < n:
            take = min(n - got, L - start)
            parts.append(np.asarray(self.tokens[start:start + take], dtype=np.int64))
            got += take
            start = 0
        return np.concatenate(parts)


def open_streams(data: str, tokenizer=None, val_fraction: float = 0.01,
                 val_docs: int = 200) -> tuple[TokenStream, TokenStream]:
    """(train, val) streams for a shard directory or builtin:NAME spec.

    Shards: the documents `data prepare` held out (index.json's val_docs, the last ones); for
    shards without them, the documents that start in the last `val_fraction` of the tokens.
    Builtin: validation is `val_docs` documents generated from a different seed, or, for a
    corpus of files (builtin:stdlib), its validation files.
    """
    if data.startswith("builtin:"):
        if tokenizer is None:
            raise ValueError(f"--data {data}: a builtin corpus needs a tokenizer to be tokenized with")
        name, n, seed, knobs = parse_builtin(data, BUILTIN_DEFAULT_DOCS)
        train = builtin_tokens(name, n, seed, tokenizer, knobs)
        if name in FILE_CORPORA:  # a corpus of files holds its own files out
            val = builtin_tokens(name, val_docs, seed, tokenizer, {**knobs, "split": "validation"})
        else:
            val = builtin_tokens(name, val_docs, seed + VAL_SEED_OFFSET, tokenizer, knobs)
        return TokenStream(train, tokenizer.vocab_size), TokenStream(val, tokenizer.vocab_size)
    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {data}: not a token shard directory or builtin:NAME "
                                "(make one with `nanoseek data prepare`)")
    shards = TokenShards(path)
    if tokenizer is not None and shards.vocab_size > tokenizer.vocab_size:
        raise ValueError(f"--data {data}: shards were tokenized with vocab_size={shards.vocab_size}, "
                         f"but the tokenizer has {tokenizer.vocab_size}; pass the tokenizer used by prepare")
    n = len(shards)
    val_docs = int(shards.index.get("val_docs", 0))
    if val_docs:  # prepare held out whole documents, drawn at random, at the end
        cut = int(shards.doc_starts[-val_docs])
    else:  # shards without a validation set: from the first document that starts in the last
        # val_fraction of the tokens (the last document when none does; a one-document stream is cut)
        starts = shards.doc_starts
        cut = int(starts[min(int(np.searchsorted(starts, n - int(n * val_fraction))), len(starts) - 1)])
        cut = cut or n - int(n * val_fraction)
    if n < 2 or cut < 2:
        raise ValueError(f"--data {data}: only {n} tokens, too few to train on")
    shuffled = bool(shards.index.get("shuffled", False))
    train = TokenStream(_Slice(shards, 0, cut), shards.vocab_size, shuffled)
    val = TokenStream(_Slice(shards, cut, n) if n - cut > 1 else _Slice(shards, 0, n), shards.vocab_size)
    return train, val


def warn_partial_pass(stream: TokenStream, tokens: int, data: str) -> None:
    """Windows are read in order: a run that reads less than one pass of a stream whose
    documents are in input order (sorted folders, an old shard directory) trains on its first
    documents only, and says so."""
    if not stream.shuffled and tokens < len(stream):
        warnings.warn(f"--data {data}: this run reads {tokens:,} of the {len(stream):,} training tokens, whose "
                      f"documents are in input order (not shuffled): it sees only the first "
                      f"{tokens / len(stream):.0%} of them; prepare the data again with --shuffle true",
                      stacklevel=2)


class _Slice:
    """A contiguous part of a TokenShards view, still lazily read."""

    def __init__(self, base, lo: int, hi: int):
        self.base, self.lo, self.hi = base, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, key: slice):
        return self.base[self.lo + key.start:self.lo + key.stop]


@dataclass
class BatchLoader:
    """Global batches of `global_batch` sequences of `seq_len` tokens; this rank's rows only.

    `next()` returns (input_ids, targets), both (B_local, seq_len) int64, targets shifted by one.
    `state_dict()` / `load_state_dict()` carry the position across a resume.
    """

    stream: TokenStream
    global_batch: int
    seq_len: int
    rank: int = 0
    world_size: int = 1
    position: int = 0  # token offset of the next global batch in the stream
    epoch: int = 0

    def __post_init__(self):
        if self.global_batch % self.world_size:
            raise ValueError(f"batch_size={self.global_batch} is not divisible by the {self.world_size} "
                             "processes; each rank reads an equal slice of the global batch")
        self.local_batch = self.global_batch // self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        # one window of global_batch·T + 1 tokens; row i is tokens [i·T, (i+1)·T + 1)
        window = self.stream.window(self.position, self.global_batch * T + 1)
        lo = self.rank * self.local_batch
        rows = np.lib.stride_tricks.sliding_window_view(window, T + 1)[::T][lo:lo + self.local_batch]
        rows = torch.from_numpy(rows.copy())
        new = self.position + self.tokens_per_step
        self.epoch += new // len(self.stream)
        self.position = new % len(self.stream)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


def val_batches(stream: TokenStream, batch: int, seq_len: int, max_tokens: int):
    """Fixed validation batches from the start of the val stream (the same every evaluation)."""
    n_rows = max(1, min(max_tokens, len(stream) - 1) // seq_len)
    window = stream.window(0, n_rows * seq_len + 1)
    rows = np.lib.stride_tricks.sliding_window_view(window, seq_len + 1)[::seq_len][:n_rows]
    rows = torch.from_numpy(rows.copy())
    for i in range(0, n_rows, batch):
        yield rows[i:i + batch, :-1], rows[i:i + batch, 1:]
