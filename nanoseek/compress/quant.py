"""Weight-only integer quantization: int8 per output channel, int4 per group of input columns.

Symmetric round-to-nearest, w ≈ q·s: int8 gives each output row w of a matrix one scale
s = max|w| / 127, q = round(w / s) ∈ [−127, 127]; int4 gives each run of `group_size` consecutive
inputs of a row its own scale s = max|w| / 7, q ∈ [−7, 7] — one 4-bit scale for a whole row
would round the row's small weights to zero.

On disk this is compressed-tensors' `pack-quantized` format (what llm-compressor writes and vLLM
and transformers read): `NAME.weight_packed` (int32, 32/b values per word), `NAME.weight_scale`,
and `NAME.weight_shape`, with a `quantization_config`
in config.json naming each quantized module. The router, the embeddings and the output head stay
in full precision (nanoseek/compress/fp8.py: KEEP); so does a matrix whose input width no
power-of-two group ≥ 16 up to `group_size` divides.

The engine runs these on integer kernels (nanoseek/compress/kernels.py); the nn.Module model,
used for training and for the validation loss, holds the dequantized values.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
MIN_GROUP = 16


def group_for(in_features: int, group_size: int) -> int | None:
    """The largest power of two ≤ group_size that divides in_features (None below MIN_GROUP)."""
    g = group_size
    while g >= MIN_GROUP and in_features % g:
        g //= 2
    return g if g >= MIN_GROUP else None


def qparams(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """The symmetric scale s = max|w| / (2^(b−1) − 1) of each row of w (out, in) (group None), or
    of each group of `group` inputs of a row: (out, 1) or (out, in / group)."""
    a = w.float().abs()
    a = a.amax(1, keepdim=True) if group is None else a.view(w.shape[0], -1, group).amax(-1)
    return (a / (2 ** (bits - 1) - 1)).clamp_min(1e-12)


def quantize(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) → (q int8 (out, in) in [−2^(b−1), 2^(b−1) − 1], scale); w ≈ q·s."""
    scale = qparams(w, bits, group)
    n, k = w.shape
    q = torch.round(w.float().view(n, scale.shape[1], -1) / scale[..., None]).clamp(-(2 ** (bits - 1)),
                                                                                   2 ** (bits - 1) - 1)
    return q.view(n, k).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q·s, per row or per group (the group width follows from the scale's shape)."""
    n, k = q.shape
    return (q.float().view(n, scale.shape[1], -1) * scale.float()[..., None]).view(n, k)


# ---------------------------------------------------------------------- the compressed-tensors layout
def _scheme(bits: int, group: int | None, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                            strategy="channel" if group is None else "group", group_size=group)
    return QuantizationScheme(targets=targets, weights=args)


def quantized_state_dict(state: dict[str, torch.Tensor], bits: int, group_size: int
                         ) -> tuple[dict[str, torch.Tensor], dict]:
    """An on-disk state dict (checkpoint.to_hf_state_dict) → (compressed-tensors tensors, quantization_config)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    from .fp8 import quantizable

    out: dict[str, torch.Tensor] = {}
    targets: dict[int | None, list[str]] = {}
    for key, t in state.items():
        group = None if bits == 8 else group_for(t.shape[-1], group_size) if t.dim() == 2 else None
        if not quantizable(key, t) or (bits < 8 and group is None):
            out[key] = t.contiguous()
            continue
        module = key.removesuffix(".weight")
        local = {"weight": t.float(), "weight_scale": qparams(t, bits, group)}
        for name, v in PackedQuantizationCompressor.compress(local, _scheme(bits, group, [module])).items():
            out[f"{module}.{name}"] = v.contiguous()
        targets.setdefault(group, []).append(module)
    groups = {f"group_{i}": _scheme(bits, g, names).model_dump(exclude_none=True)
              for i, (g, names) in enumerate(sorted(targets.items(), key=lambda kv: kv[0] or 0))}
    qc = {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
          "config_groups": groups, "ignore": ["lm_head"]}
    return out, qc


def _match(module: str, targets: list[str]) -> bool:
    return any(t == module or t == "Linear" or (t.startswith("re:") and re.fullmatch(t[3:], module))
               for t in targets)


def schemes(qc: dict) -> list[tuple[list[str], dict]]:
    """(targets, weights args) of each config group of a compressed-tensors quantization_config."""
    out = []
    for name, g in (qc.get("config_groups") or {}).items():
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
            raise ValueError(f"quantization_config.config_groups.{name}: expected targets and weights")
        out.append((list(g.get("targets", [])), g["weights"]))
    return out


def scheme_of(module: str, qc: dict) -> dict:
    for targets, args in schemes(qc):
        if _match(module, targets):
            return args
    raise ValueError(f"quantization_config: no config group targets {module!r}")


def decode(key: str, get, qc: dict) -> torch.Tensor:
    """The float tensor `key` of a compressed-tensors directory (`get(name)` reads a stored tensor),
    decompressed by compressed-tensors itself."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    module = key.removesuffix(".weight")
    try:
        packed = get(module + ".weight_packed")
    except KeyError:
        return get(key)
    args = QuantizationArgs(**scheme_of(module, qc))
    local = {"weight_packed": packed, "weight_scale": get(module + ".weight_scale"),
             "weight_shape": get(module + ".weight_shape")}
    if not args.symmetric:
        raise ValueError(f"{module}: asymmetric compressed-tensors weights; nanoseek reads symmetric ones")
    scheme = QuantizationScheme(targets=[module], weights=args)
    return PackedQuantizationCompressor.decompress(local, scheme)["weight"].float()


def kernel_spec(qc: dict) -> dict | None:
    """What the engine packs its folded matrices into: {"bits": 8} or {"bits": 4, "group_size": g}
    (the largest group of the checkpoint; each matrix takes the largest that divides its width)."""
    args = [a for _, a in schemes(qc)]
    if not args or any(a.get("type", "int") != "int" for a in args):
        return None
    bits = {int(a.get("num_bits", 8)) for a in args}
    if bits == {8}:
        return {"bits": 8}
    if bits == {4}:
        return {"bits": 4, "group_size": max(int(a.get("group_size") or 128) for a in args)}
    return None


# ---------------------------------------------------------------------- the methods
def _compress(cfg, bits: int) -> dict:
    from ..checkpoint import ckpt_flag, load_pretrained, to_hf_state_dict
    from .save import weight_bytes, write_quantized

    src = ckpt_flag(cfg.ckpt)
    model = load_pretrained(src)
    state, qc = quantized_state_dict(to_hf_state_dict(model), bits, cfg.group_size)
    write_quantized(src, model, state, qc, cfg.out)
    n = sum(len(g["targets"]) for g in qc["config_groups"].values())
    return {"bits": bits, "group_size": None if bits == 8 else cfg.group_size, "matrices_quantized": n,
            "bytes": weight_bytes(Path(cfg.out)), "source_bytes": weight_bytes(src)}


def compress_int8(cfg) -> dict:
    """`--method int8`: weight-only int8, one scale per output channel."""
    return _compress(cfg, 8)


def compress_int4(cfg) -> dict:
    """`--method int4`: weight-only int4, one scale per `--group-size` inputs of a row."""
    return _compress(cfg, 4)
