"""Checkpoints are Hugging Face `deepseek_v3` directories: config.json + model.safetensors.

transformers (and so vLLM / SGLang) loads what we write as it is, and we load what they write.
The only differences between nanoseek's module tree and the on-disk names are mechanical:
a `model.` prefix, routed experts stacked in memory but stored one key per expert, and the MTP
modules living at `model.layers.{num_hidden_layers + k}` on disk.

Every write is atomic: the directory is assembled under a temporary name beside the target and
renamed into place, so a crash never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import DeepSeekV3

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


# ---------------------------------------------------------------------- name mapping
def to_hf_state_dict(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """nanoseek state dict → on-disk names (docs/deepseek.md, weight names)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if name.startswith("rotary."):
            continue
        if name == "lm_head.weight":
            out[name] = t
            continue
        if name.startswith("mtp."):
            _, k, rest = name.split(".", 2)
            base = f"model.layers.{cfg.num_hidden_layers + int(k)}."
            rest = rest.removeprefix("block.").replace("shared_head_norm", "shared_head.norm")
            name = base + rest
            if m := re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(\w+_proj)$", name):
                for e in range(t.shape[0]):
                    out[f"{m[1]}.{e}.{m[2]}.weight"] = t[e].contiguous()
                continue
            out[name] = t
            continue
        if m := _EXPERT.match(name):
            for e in range(t.shape[0]):
                out[f"model.{m[1]}.{e}.{m[2]}.weight"] = t[e].contiguous()
            continue
        out["model." + name] = t
    for k in range(cfg.num_nextn_predict_layers):  # copies of the shared embedding and head
        base = f"model.layers.{cfg.num_hidden_layers + k}."
        out[base + "embed_tokens.weight"] = model.embed_tokens.weight.detach().clone()
        out[base + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    for name in list(out):
        if name.endswith("e_score_correction_bias"):
            out[name] = out[name].float()
    return out


def _from_hf_name(name: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """On-disk name → (nanoseek name, expert index or None); None for keys we do not keep."""
    if name == "lm_head.weight":
        return name, None
    if not name.startswith("model."):
        return None
    name = name[len("model."):]
    expert = None
    if m := re.match(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+_proj)\.weight$", name):
        name, expert = f"{m[1]}.{m[3]}", int(m[2])
    if m := re.match(r"^layers\.(\d+)\.(.*)$", name):
        i, rest = int(m[1]), m[2]
        if i >= cfg.num_hidden_layers:
            k = i - cfg.num_hidden_layers
            if k >= cfg.num_nextn_predict_layers or rest.startswith(("embed_tokens.", "shared_head.head.")):
                return None  # shared tensors (or MTP depths this config does not have)
            if rest.startswith("shared_head.norm."):
                rest = rest.replace("shared_head.norm", "shared_head_norm")
            elif not rest.startswith(("enorm.", "hnorm.", "eh_proj.")):
                rest = "block." + rest
            return f"mtp.{k}.{rest}", expert
    return name, expert


# ---------------------------------------------------------------------- atomic directory writes
@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_writes(parent: str | Path) -> None:
    """Delete the temporary directories `atomic_dir` leaves in `parent` when its process is killed
    mid-write (`.NAME.tmp-*`, `.NAME.old-*`). Call it only where no other writer is running — a
    run's own directory at its start."""
    parent = Path(parent)
    if parent.is_dir():
        for d in [*parent.glob(".*.tmp-*"), *parent.glob(".*.old-*")]:
            shutil.rmtree(d, ignore_errors=True)


def save_pretrained(model: DeepSeekV3, path: str | Path, extra: dict[str, object] | None = None) -> Path:
    """Write config.json + model.safetensors (+ `extra`: name → bytes | str | callable(dir)) atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        cfg = model.config
        dtype = next(model.parameters()).dtype
        cfg = cfg.replace(torch_dtype=str(dtype).removeprefix("torch."))
        cfg.save(tmp / "config.json")
        save_file(to_hf_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        for name, content in (extra or {}).items():
            if callable(content):
                content(tmp)
            elif isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(str(content))
    return path


# ---------------------------------------------------------------------- loading
RUN_MODEL = "model"  # where every training stage writes its result inside its run directory


def resolve_ckpt(path: str | Path) -> Path:
    """The checkpoint directory `path` names: `path` itself, or `path/model/` when `path` is a
    run directory (what every training stage writes), so `--ckpt RUN` works for any stage's RUN.

    A directory that is neither is refused here, in one line that names it: a file, an empty
    directory, and a run that has not finished (no model/ yet; its periodic checkpoints are
    named) would otherwise fail later with an error about some file inside it. A directory that
    looks like a checkpoint is returned as it is, for the loader to check its files."""
    p = Path(path)
    if p.is_file():
        raise CheckpointError(f"{p}: is a file; expected a checkpoint directory (config.json, model.safetensors) "
                              f"or a run directory (with {RUN_MODEL}/)")
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such checkpoint directory")
    if (p / WEIGHTS).is_file() or (p / INDEX).is_file():
        return p
    if (p / RUN_MODEL / "config.json").is_file():
        return p / RUN_MODEL
    if (p / "metrics.jsonl").is_file() or (p / "checkpoints").is_dir():
        steps = sorted((p / "checkpoints").glob("step_*"))
        hint = f"pass one of its checkpoints (newest: {steps[-1]}) or " if steps else ""
        raise FileNotFoundError(f"{p}: a run directory with no {RUN_MODEL}/ (the run has not finished); "
                                f"{hint}continue it with --resume")
    if not any(p.iterdir()):
        raise FileNotFoundError(f"{p}: empty directory; expected a checkpoint (config.json, model.safetensors) "
                                f"or a run directory (with {RUN_MODEL}/)")
    return p


def ckpt_flag(path: str | Path, flag: str = "--ckpt") -> Path:
    """resolve_ckpt for a command's flag: the same refusals, the flag named first."""
    try:
        return resolve_ckpt(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise type(e)(f"{flag} {e}") from None


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key or field."""


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS).exists():
        return [path / WEIGHTS]
    if (path / INDEX).exists():
        try:
            index = json.loads((path / INDEX).read_text())
            return [path / f for f in sorted(set(index["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / INDEX}: not a valid safetensors index ({e})") from None
    raise FileNotFoundError(f"{path}: no {WEIGHTS} or {INDEX} here")


def _headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Every tensor's file, shape and dtype, from the safetensors headers alone (no data read)."""
    out: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    out[k] = (f, tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    return out


def available_memory() -> int | None:
    """Bytes of memory this process may still allocate (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_size(cfg: ModelConfig, where: Path) -> dict[str, torch.Size]:
    """The model's tensor shapes (built on the meta device: nothing allocated), after checking
    that building it for real fits in memory: a config for 671B parameters must be one line,
    not the kernel's OOM killer."""
    with torch.device("meta"):
        meta = DeepSeekV3(cfg)
    shapes = {k: v.shape for k, v in meta.state_dict().items()}
    n = sum(p.numel() for p in meta.parameters()) + sum(b.numel() for b in meta.buffers())
    need = 4 * n  # built in float32, then cast
    have = available_memory()
    if have is not None and need > have:
        raise CheckpointError(f"{where}: this config describes a {n / 1e9:.2f}B-parameter model, "
                              f"{need / 2**30:.1f} GiB to build in float32, but only {have / 2**30:.1f} GiB of "
                              "memory is available")
    return shapes


def _plan(cfg: ModelConfig, headers, shapes: dict[str, torch.Size], where: Path) -> list[tuple[str, str, int | None]]:
    """Check every tensor on disk against the config before anything is built: known key,
    floating dtype, shape; decoder layers exactly ``num_hidden_layers``; nothing missing.
    Returns (disk key, nanoseek name, expert index) for each tensor to copy."""
    layers: dict[int, str] = {}
    for key, (f, _, _) in headers.items():
        if m := re.match(r"^model\.layers\.(\d+)\.", key):
            layers.setdefault(int(m[1]), f.name)
    mtp = {i for i in layers if f"model.layers.{i}.eh_proj.weight" in headers}
    main = sorted(set(layers) - mtp)
    if main != list(range(cfg.num_hidden_layers)):
        shown = f"model.layers.{main[0]}-{main[-1]}" if main else "none"
        raise CheckpointError(f"{where / (layers[main[-1]] if main else WEIGHTS)}: holds {len(main)} decoder "
                              f"layers ({shown}) but {where / 'config.json'} says num_hidden_layers="
                              f"{cfg.num_hidden_layers}")
    plan, seen = [], set()
    for key, (f, shape, dt) in headers.items():
        mapped = _from_hf_name(key, cfg)
        if mapped is None:
            continue
        name, expert = mapped
        if name not in shapes:
            raise CheckpointError(f"{f}: unexpected key {key!r} for this config.json")
        want = tuple(shapes[name][1:] if expert is not None else shapes[name])
        if expert is not None and not 0 <= expert < shapes[name][0]:
            raise CheckpointError(f"{f}: key {key!r} names expert {expert}, config.json has {shapes[name][0]}")
        if dt not in FLOAT_DTYPES:
            raise CheckpointError(f"{f}: key {key!r} has dtype {dt}; expected a floating-point tensor "
                                  f"({', '.join(sorted(FLOAT_DTYPES))})")
        if shape != want:
            raise CheckpointError(f"{f}: key {key!r} has shape {shape}, config.json implies {want}")
        plan.append((key, name, expert))
        seen.add(name if expert is None else f"{name}.{expert}")
    missing = []
    for name, shape in shapes.items():
        if name.startswith("rotary.") or name.endswith("tokens_per_expert"):
            continue
        if _EXPERT.match(name) or re.match(r"^mtp\.\d+\.block\.mlp\.experts\.\w+_proj$", name):
            missing += [f"{name}.{e}" for e in range(shape[0]) if f"{name}.{e}" not in seen]
        elif name not in seen:
            missing.append(name)
    mtp_missing = [m for m in missing if m.startswith("mtp.")]
    if mtp_missing:  # transformers drops MTP weights on save; keep the randomly initialised ones
        warnings.warn(f"{where}: no multi-token-prediction weights on disk ({len(mtp_missing)} tensors); "
                      "the MTP modules are freshly initialised", stacklevel=4)
    missing = [m for m in missing if not m.startswith("mtp.")]
    if missing:
        raise CheckpointError(f"{where}: missing weights for {missing[:5]}{' …' if len(missing) > 5 else ''}")
    return plan


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> DeepSeekV3:
    """A checkpoint directory (ours or transformers'), or a run directory holding one in model/,
    → DeepSeekV3 in eval mode.

    Everything that can be checked without the model is checked before it is built: the config's
    fields, the model's size against free memory, every tensor's key, dtype and shape and the
    layer count (from the safetensors headers) — and every value is finite, read one tensor at a
    time. Only then is the model built, and the values copied in (never all of the file and the
    model in memory at once).

    A directory whose config.json has a `quantization_config` (DeepSeek's fp8 blocks,
    compressed-tensors int8/int4: nanoseek/compress/) is dequantized as it is read; for int8/int4
    `model.quantization` tells the engine which integer kernels to run.
    """
    from .compress.formats import Codec, quantization_config

    path = resolve_ckpt(path)
    cfg = ModelConfig.load(path / "config.json")
    files = _weight_files(path)
    headers = _headers(files)
    qc = quantization_config(path)  # fp8 / int8 / int4 directories: read through their codec
    codec = Codec(qc, path) if qc else None
    if codec is not None:
        read = _reader(headers)
        headers = codec.headers(headers, read)
    shapes = _check_size(cfg, path / "config.json")
    plan = _plan(cfg, headers, shapes, path)
    by_file: dict[Path, list[tuple[str, str, int | None]]] = {}
    for key, name, expert in plan:
        by_file.setdefault(headers[key][0], []).append((key, name, expert))

    def tensors():  # a quantized tensor is decoded on each pass, so it too is never held twice
        if codec is None:
            return _tensors(by_file)
        return (((key, name, expert), codec.read(key, read)) for key, name, expert in plan)

    for (key, _, _), t in tensors():  # values first, one tensor at a time: nothing built yet
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{headers[key][0]}: key {key!r} holds NaN or infinite values")
    model = DeepSeekV3(cfg)  # initialised, so anything the file may lack (MTP) has defined values
    own = model.state_dict()
    with torch.no_grad():
        for (_, name, expert), t in tensors():
            (own[name][expert] if expert is not None else own[name]).copy_(t)
    model.quantization = codec.kernel if codec is not None else None  # what the engine packs into
    return cast(model.to(device), dtype).eval()


def _reader(headers: dict[str, tuple[Path, tuple[int, ...], str]]):
    """key → the stored tensor, from whichever file holds it (a quantized weight's scales are
    separate keys, possibly in another shard)."""
    def read(key: str) -> torch.Tensor:
        if key not in headers:
            raise KeyError(key)
        f = headers[key][0]
        try:
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    return read


def _tensors(by_file: dict[Path, list[tuple[str, str, int | None]]]):
    """((key, name, expert), tensor) for every planned tensor, read one at a time (the OS caches
    the pages, so the second pass over a file is cheap)."""
    for f, items in by_file.items():
        try:
            with safe_open(str(f), framework="pt") as h:
                for item in items:
                    yield item, h.get_tensor(item[0])
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None


def cast(model: DeepSeekV3, dtype: torch.dtype | None) -> DeepSeekV3:
    """Cast weights to `dtype`, keeping the router bias in fp32 (it steers selection by tiny steps)."""
    if dtype is None:
        return model
    model.to(dtype)
    for m in model.moe_layers():
        if hasattr(m.gate, "e_score_correction_bias"):
            m.gate.e_score_correction_bias.data = m.gate.e_score_correction_bias.data.float()
        m.tokens_per_expert.data = m.tokens_per_expert.data.float()
    model.rotary.theta.data = model.rotary.theta.data.float()
    return model
