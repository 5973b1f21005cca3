"""What every method writes beside its weights, and how big a checkpoint is on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def copy_side_files(src: Path, dst: Path) -> None:
    """The tokenizer (and generation defaults) travel with the compressed weights."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def weight_bytes(path: Path) -> int:
    """Bytes of a checkpoint's safetensors files."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
