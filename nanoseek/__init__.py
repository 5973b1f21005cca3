"""nanoseek: the DeepSeek system, small enough to read and run on a laptop CPU."""

from __future__ import annotations

from pathlib import Path

from .config import PRESETS, ModelConfig, preset
from .model import DeepSeekV3

__version__ = "0.1.0"


def load_model(path_or_preset: str | Path, device: str = "cpu", dtype=None, seed: int | None = None) -> DeepSeekV3:
    """A checkpoint directory (nanoseek's or transformers'), any training stage's run directory
    (its model/), or a preset name → the model.

    A preset gives a freshly initialised model (seeded with `seed` when given).
    """
    import torch

    from .checkpoint import cast, load_pretrained

    p = Path(path_or_preset)
    if p.is_dir():
        return load_pretrained(p, device=device, dtype=dtype)
    if str(path_or_preset) in PRESETS:
        if seed is not None:
            torch.manual_seed(seed)
        return cast(DeepSeekV3(preset(str(path_or_preset))).to(device), dtype)
    raise FileNotFoundError(f"{path_or_preset!r} is neither a checkpoint directory nor a preset "
                            f"({', '.join(PRESETS)})")


def __getattr__(name):  # heavy pieces on first use: `nanoseek.Engine`, `nanoseek.SamplingParams`
    if name in ("Engine", "SamplingParams"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)


__all__ = ["ModelConfig", "preset", "PRESETS", "DeepSeekV3", "load_model"]
