"""Exact and near-duplicate detection that streams.

Duplicates waste compute and make a model memorise; near-duplicates (the same
page with a date or a name changed) are most of the problem on real corpora.

State is small on purpose: a 16-byte hash per kept document for exact
duplicates, and the MinHash LSH band tables (no texts) for near-duplicates.
A document is a near-duplicate when a kept document's estimated Jaccard
similarity of word 5-gram shingles is at least ``threshold``.

LSH alone is a coin with a soft edge: with datasketch's default band layout a
pair at Jaccard 0.9 is missed about 7% of the time. We choose the bands instead
so that there are more bands than the mismatches a duplicate may have: a pair
whose signatures differ in at most ``(1 - threshold) * num_perm`` positions
(estimate >= threshold) then agrees on at least one whole band, so it is always
a candidate. Candidates are then checked against their stored signature
(``num_perm`` uint32 values, 512 bytes per kept document, less than the LSH
tables themselves hold), which removes LSH's false positives. The result is
exactly "estimated Jaccard >= threshold", with no luck involved.
"""

from __future__ import annotations

import hashlib

import numpy as np

from datasketch import MinHash, MinHashLSH


class ExactDedup:
    """Remembers the blake2b hash of every text it has seen."""

    def __init__(self):
        self._seen: set[bytes] = set()

    def seen(self, key: str) -> bool:
        """True if ``key`` was seen before; otherwise remember it."""
        h = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
        if h in self._seen:
            return True
        self._seen.add(h)
        return False

    def __len__(self) -> int:
        return len(self._seen)


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Word n-grams of the lower-cased text (the whole text when shorter)."""
    words = text.lower().split()
    if len(words) < n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def band_layout(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands > the mismatches allowed at ``threshold``."""
    allowed = int((1.0 - threshold) * num_perm)
    rows = max(1, num_perm // (allowed + 1))
    return num_perm // rows, rows


class NearDedup:
    """MinHash LSH over word shingles (datasketch)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"near-dup threshold must be in (0, 1), got {threshold}")
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        b, r = band_layout(threshold, num_perm)
        self._lsh = MinHashLSH(num_perm=num_perm, params=(b, r))
        self._sigs: list[np.ndarray] = []

    def minhash(self, text: str) -> MinHash:
        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(list(shingles(text, self.ngram)))
        return m

    def seen(self, text: str) -> bool:
        """True if a near-duplicate was kept before; otherwise index ``text``."""
        m = self.minhash(text)
        sig = m.hashvalues.astype(np.uint32)  # datasketch hashes fit in 32 bits
        for key in self._lsh.query(m):
            if np.mean(self._sigs[key] == sig) >= self.threshold:
                return True
        self._lsh.insert(len(self._sigs), m, check_duplication=False)
        self._sigs.append(sig)
        return False
