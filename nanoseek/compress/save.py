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


def write_quantized(src: Path, model, state: dict, qc: dict, out: str | Path) -> None:
    """A quantized state dict (on-disk names) and its `quantization_config` as a checkpoint
    directory beside the source's tokenizer, written atomically."""
    import json

    from safetensors.torch import save_file

    from ..checkpoint import WEIGHTS, atomic_dir

    with atomic_dir(out) as tmp:
        d = model.config.to_hf_dict()
        d["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(d, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        copy_side_files(src, tmp)
