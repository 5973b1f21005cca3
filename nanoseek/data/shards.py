"""Token shards: flat binary files of token ids that training memory-maps.

Layout of a shard directory::

    index.json              format, dtype, vocab_size, eos_id, per-shard token
                            and document counts; val_docs (the last val_docs
                            documents are the validation set) and shuffled
    shard_00000.bin         raw token ids (uint16 when vocab < 65536, else uint32)
    shard_00000.docs.npy    int64 start offset of each document inside the shard

Every document is followed by ``<|eos|>``; a document never spans two shards.
Why raw ``.bin`` + memmap: the pretraining loop samples random windows, and a
memmap reads only the pages it touches, so a corpus larger than RAM works and
startup is instant. Doc starts live in ``.npy`` files, not in the json, so the
index stays small however many documents there are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

INDEX = "index.json"
FORMAT = "nanoseek-token-shards"
VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id (half the disk of int32)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents to shards of about ``shard_tokens`` tokens each."""

    def __init__(self, out_dir, vocab_size: int, eos_id: int, shard_tokens: int = 1 << 26):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.eos_id, self.shard_tokens = vocab_size, eos_id, shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.shards: list[dict] = []
        self._file = None
        self._n = 0  # tokens in the open shard
        self._starts: list[int] = []

    def _open(self):
        name = f"shard_{len(self.shards):05d}"
        self._file = open(self.dir / f"{name}.bin", "wb")
        self._name, self._n, self._starts = name, 0, []

    def _close(self):
        if self._file is None:
            return
        self._file.close()
        np.save(self.dir / f"{self._name}.docs.npy", np.asarray(self._starts, dtype=np.int64))
        self.shards.append({"file": f"{self._name}.bin", "docs_file": f"{self._name}.docs.npy",
                            "tokens": self._n, "docs": len(self._starts)})
        self._file = None

    def add(self, ids: list[int]) -> int:
        """Write one document (``<|eos|>`` appended); returns tokens written."""
        n = len(ids) + 1
        if self._file is not None and self._n > 0 and self._n + n > self.shard_tokens:
            self._close()
        if self._file is None:
            self._open()
        arr = np.empty(n, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = self.eos_id
        self._file.write(arr.tobytes())
        self._starts.append(self._n)
        self._n += n
        return n

    def close(self, **meta) -> dict:
        """Finish the open shard and write ``index.json`` (with ``meta``); returns the index."""
        self._close()
        index = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name,
                 "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                 "num_tokens": sum(s["tokens"] for s in self.shards),
                 "num_docs": sum(s["docs"] for s in self.shards), **meta, "shards": self.shards}
        (self.dir / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        return index


def reorder(src, dst, val_fraction: float, seed: int, shuffle: bool = True, shard_tokens: int = 1 << 26) -> dict:
    """Rewrite the shards of ``src`` into ``dst`` in a seeded order; returns the new index.

    ``round(val_fraction · docs)`` documents (at least one of two or more, never all), drawn at
    random, go last: the validation set, by document (index ``val_docs``). The others follow in
    a seeded random order with ``shuffle``, else in the order of ``src``. Documents are copied
    one by one from the memmap, so memory holds the document offsets only.
    """
    ts = TokenShards(src)
    n = len(ts.doc_starts)
    rng = np.random.default_rng(seed)
    n_val = min(max(1, round(n * val_fraction)), n - 1) if n > 1 and val_fraction > 0 else 0
    val = np.sort(rng.choice(n, n_val, replace=False)) if n_val else np.empty(0, np.int64)
    train = np.setdiff1d(np.arange(n), val)
    if shuffle:
        rng.shuffle(train)
    writer = ShardWriter(dst, ts.vocab_size, ts.eos_id, shard_tokens)
    for i in np.concatenate([train, val]):
        writer.add(ts.document(int(i))[:-1])  # add() closes it with <|eos|> again
    return writer.close(val_docs=int(n_val), shuffled=bool(shuffle), seed=int(seed))


class TokenShards:
    """Read-only view of a shard directory as one long token sequence.

    ``ts[i:j]`` returns tokens i..j across shard borders; ``ts.shards`` holds
    the per-shard memmaps; ``ts.doc_starts`` the global start of each document.
    """

    def __init__(self, path):
        self.dir = Path(path)
        index_file = self.dir / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"token shard index not found: {index_file} (run `nanoseek data prepare`)")
        try:
            index = json.loads(index_file.read_text())
            if index.get("format") != FORMAT:
                raise ValueError(f"format is {index.get('format')!r}, expected {FORMAT!r}")
            self.dtype = np.dtype(index["dtype"])
            entries = index["shards"]
            self.vocab_size, self.eos_id = int(index["vocab_size"]), int(index["eos_id"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"corrupt token shard index {index_file}: {e}") from e
        self.index = index
        self.shards: list[np.ndarray] = []
        starts: list[np.ndarray] = []
        offset = 0
        for entry in entries:
            bin_file = self.dir / entry["file"]
            docs_file = self.dir / entry["docs_file"]
            for f in (bin_file, docs_file):
                if not f.is_file():
                    raise FileNotFoundError(f"token shard file missing: {f} (listed in {index_file})")
            n = int(entry["tokens"])
            size = bin_file.stat().st_size
            if size != n * self.dtype.itemsize:
                raise ValueError(f"token shard {bin_file} has {size} bytes, index {index_file} says "
                                 f"{n} tokens of {self.dtype.name}")
            self.shards.append(np.memmap(bin_file, dtype=self.dtype, mode="r", shape=(n,)) if n
                               else np.empty(0, self.dtype))
            try:
                doc_starts = np.load(docs_file)
            except ValueError as e:
                raise ValueError(f"corrupt document index {docs_file}: {e}") from e
            starts.append(doc_starts.astype(np.int64) + offset)
            offset += n
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # shard starts
        self.doc_starts = np.concatenate(starts) if starts else np.empty(0, np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokens(self) -> "TokenShards":
        """The concatenated token sequence (this object; slice it)."""
        return self

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"token index {key} out of range for {len(self)} tokens")
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.shards[s][i - self.offsets[s]]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenShards supports ints and contiguous slices")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.empty(0, self.dtype)
        parts = []
        s = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            lo = start - self.offsets[s]
            hi = min(stop, self.offsets[s + 1]) - self.offsets[s]
            parts.append(np.asarray(self.shards[s][lo:hi]))
            start = self.offsets[s] + hi
            s += 1
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i``, including its closing ``<|eos|>``."""
        end = self.doc_starts[i + 1] if i + 1 < len(self.doc_starts) else len(self)
        return self[int(self.doc_starts[i]):int(end)]
