"""`nanoseek compress`: a checkpoint made smaller or faster, written as a new checkpoint directory.

Each method reads `--ckpt` and writes `--out` in a layout another loader also reads (fp8:
DeepSeek's own FP8 release; int8/int4: compressed-tensors; pruning: a plain `deepseek_v3`
checkpoint with zeros), and nanoseek loads each of them back. `--sweep` runs every method ×
setting on this machine and measures what each costs and gains (nanoseek/compress/sweep.py).

A method is one entry of METHODS: name → "module:function", the function taking the
CompressConfig and returning a dict that summarises what it wrote (it is also saved as
`OUT/compression.json`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

METHODS: dict[str, str] = {
    "fp8": "nanoseek.compress.fp8:compress_fp8",
    "int8": "nanoseek.compress.quant:compress_int8",
    "int4": "nanoseek.compress.quant:compress_int4",
    "magnitude": "nanoseek.compress.prune:compress_magnitude",
    "wanda": "nanoseek.compress.prune:compress_wanda",
    "experts": "nanoseek.compress.experts:compress_experts",
}
SUMMARY = "compression.json"


@dataclass
class CompressConfig:
    ckpt: str = field(metadata={"help": "checkpoint directory, or any stage's run directory (its model/)"})
    method: str | None = field(default=None, metadata={"help": "fp8 | int8 | int4 | magnitude | wanda | experts "
                                                                "(one of METHODS; not with --sweep)"})
    out: str | None = field(default=None, metadata={"help": "the compressed checkpoint's directory "
                                                             "(with --sweep: the sweep's directory)"})
    sparsity: float = field(default=0.5, metadata={"help": "pruning: fraction of each matrix's weights set to 0"})
    pattern: str = field(default="unstructured", metadata={"help": "pruning: unstructured | N:M (e.g. 2:4: "
                                                                   "N zeros in every M consecutive inputs)"})
    score: str = field(default="reap", metadata={"help": "experts: how a routed expert's usefulness is scored on the "
                                                         "calibration data (reap: gate-weighted output norm; "
                                                         "frequency: share of routed tokens); --sparsity is then "
                                                         "the fraction of routed experts dropped per layer",
                                                 "choices": ["reap", "frequency"]})
    group_size: int = field(default=128, metadata={"help": "int4: input columns sharing one scale and zero"})
    calib: str = field(default="builtin:arith?n=500&chat=0.3", metadata={
        "help": "calibration and validation data (Wanda's activations, the sweep's bits per byte): "
                "a token shard directory or builtin:NAME"})
    calib_samples: int = field(default=32, metadata={"help": "calibration sequences"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration / validation sequence"})
    val_tokens: int = field(default=16384, metadata={"help": "validation tokens (loss, bits per byte)"})
    sweep: bool = field(default=False, metadata={"help": "run every method × setting and measure each"})
    budget: float | None = field(default=None, metadata={
        "help": "with --sweep: the fastest variant whose held-out accuracy is at most this many points "
                "below the original's"})
    task: str = field(default="arithmetic", metadata={"help": "with --sweep: the held-out task scored "
                                                              "(nanoseek eval's --task)"})
    task_args: dict = field(default_factory=dict, metadata={"help": 'with --sweep: task knobs as JSON'})
    n: int = field(default=100, metadata={"help": "with --sweep: held-out problems scored per variant"})
    seed: int = field(default=0, metadata={"help": "calibration sample and held-out problem seed"})

    def __post_init__(self) -> None:
        if self.sweep:
            if self.method is not None:
                raise ValueError("--method: not with --sweep (the sweep runs every method)")
        elif self.method is None:
            raise ValueError("--method: required (one of " + ", ".join(METHODS) + "), or give --sweep")
        elif self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.out is None:
            raise ValueError("--out: required (the compressed checkpoint's directory; with --sweep, the sweep's)")
        if self.budget is not None and not self.sweep:
            raise ValueError("--budget: only with --sweep")
        if self.budget is not None and not self.budget >= 0:
            raise ValueError(f"--budget {self.budget}: must be ≥ 0 (points of accuracy)")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"--sparsity {self.sparsity}: must be in [0, 1)")
        parse_pattern(self.pattern)
        if self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise ValueError(f"--group-size {self.group_size}: must be a power of two ≥ 1 (e.g. 32, 64, 128)")
        for name in ("calib_samples", "seq_len", "val_tokens", "n"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be ≥ 1")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' → None; 'N:M' → (N, M): N of every M consecutive input weights are zero."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise ValueError(f"--pattern {pattern!r}: expected unstructured or N:M with 0 < N < M (e.g. 2:4)")
    return n, m


def method_fn(name: str):
    mod, fn = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), fn)


def compress(cfg: CompressConfig) -> dict:
    """Compress cfg.ckpt with cfg.method into cfg.out (or run the sweep); returns the summary."""
    if cfg.sweep:
        from .sweep import sweep

        return sweep(cfg)
    summary = {"method": cfg.method, **method_fn(cfg.method)(cfg)}
    Path(cfg.out, SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def compress_cmd(cfg: CompressConfig) -> dict:
    """Quantize (fp8, int8, int4) or prune (magnitude, Wanda) a checkpoint; --sweep measures them all."""
    return compress(cfg)


__all__ = ["METHODS", "CompressConfig", "compress", "parse_pattern"]
