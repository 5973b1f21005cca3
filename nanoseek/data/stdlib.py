"""`builtin:stdlib`: the running interpreter's standard library as a code corpus.

Every machine that runs nanoseek has it, so a code model can be trained and measured with
nothing to download. One ``.py`` file is one document; installed packages (``site-packages``)
and byte-code caches are not part of it.

The train / validation split is by FILE and seeded: the sorted file list is shuffled with
``random.Random(seed)`` and the first ``val_fraction`` of it is validation. A held-out file is
then unseen as a whole (no function of it leaks into training through a neighbouring window),
and the same seed names the same held-out files on every machine with the same Python.
Both splits come out in that shuffled order, so a run that reads only part of the corpus reads
a sample of it, not the alphabetically first packages.
"""

from __future__ import annotations

import functools
import os
import random
import sysconfig
from pathlib import Path
from typing import Iterator

SPLITS = ("train", "validation", "all")
DEFAULT_N = 1_000_000  # more files than any standard library has: n caps, never pads


def root() -> Path:
    """The standard library's directory (``Lib``) of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def _all_files() -> tuple[Path, ...]:
    out = []
    for d, subdirs, names in os.walk(root()):
        subdirs[:] = [s for s in subdirs if s not in ("site-packages", "dist-packages", "__pycache__")]
        out += [Path(d) / n for n in names if n.endswith(".py")]
    return tuple(out)


def files(n_docs: int | None = None, seed: int = 0, split: str = "train", val_fraction: float = 0.05) -> list[Path]:
    """The ``.py`` files of ``split``, in the seeded order, at most ``n_docs`` of them."""
    if split not in SPLITS:
        raise ValueError(f"builtin:stdlib: split={split!r}; expected one of {', '.join(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"builtin:stdlib: val_fraction={val_fraction} must be in [0, 1)")
    paths = sorted(_all_files())
    random.Random(f"stdlib:{seed}").shuffle(paths)
    n_val = round(len(paths) * val_fraction)
    chosen = {"train": paths[n_val:], "validation": paths[:n_val], "all": paths}[split]
    return chosen if n_docs is None else chosen[:n_docs]


def documents(n_docs: int | None, seed: int, split: str = "train", val_fraction: float = 0.05) -> Iterator[str]:
    """The text of each file of ``files(...)``; a file that is not UTF-8 is left out (the
    standard library's own tests keep a few on purpose). `data prepare` reads the same files
    through `sources`, which counts and names the ones it leaves out."""
    for p in files(n_docs, seed, split, val_fraction):
        try:
            yield p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
