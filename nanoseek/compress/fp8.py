"""FP8 weights in DeepSeek's own release layout: e4m3 values in 128×128 blocks, one float32 scale each.

Every matrix W (out, in) of the attention projections, the dense FFNs and the experts is cut into
128×128 blocks (the last row and column of blocks may be narrower); a block B is stored as
q = e4m3(B / s) with s = max|B| / 448 (448: e4m3's largest finite value), and s itself is stored
beside it as `NAME.weight_scale_inv` (float32, shape (⌈out/128⌉, ⌈in/128⌉)): dequantizing is
q · s, block by block. The router, the norms, the embeddings and the output head stay in high
precision, as in DeepSeek's release (they are small, and the router's choices and the head's
logits are where rounding hurts most). config.json carries DeepSeek's `quantization_config`,
which is what transformers (and vLLM, SGLang) key on.

On CPU there is no fast fp8 matmul: nanoseek (and transformers) load such a directory by
dequantizing each block once, at load time.
"""

from __future__ import annotations

from pathlib import Path

import torch

BLOCK = 128
E4M3_MAX = 448.0
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK]}
# high-precision tensors (besides every 1-D one: norms, the router bias)
KEEP = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight", "mlp.gate.weight")


def quantizable(key: str, t: torch.Tensor) -> bool:
    """A matrix that DeepSeek's layout stores in fp8: 2-D, and not the router, an embedding or a head."""
    return t.dim() == 2 and key.endswith(".weight") and not key.endswith(KEEP)


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """w (out, in) zero-padded to whole blocks, viewed (out/b0, b0, in/b1, b1); and the unpadded shape."""
    b0, b1 = block
    n, k = w.shape
    pad = torch.nn.functional.pad(w, (0, -k % b1, 0, -n % b0))
    return pad.view(pad.shape[0] // b0, b0, pad.shape[1] // b1, b1), (n, k)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) → (e4m3 values (out, in), float32 scale_inv (⌈out/b0⌉, ⌈in/b1⌉)), W ≈ q · s per block."""
    blocks, (n, k) = _blocks(w.float(), block)
    s = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-12) / E4M3_MAX
    q = (blocks / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(blocks.shape[0] * block[0], blocks.shape[2] * block[1])[:n, :k].contiguous()
    return q, s[:, 0, :, 0].contiguous()


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> torch.Tensor:
    """e4m3 (out, in) and its per-block scale_inv → float32 W = q · s, block by block."""
    blocks, (n, k) = _blocks(q.float(), block)
    w = blocks * scale_inv.float()[:, None, :, None]
    return w.view(blocks.shape[0] * block[0], blocks.shape[2] * block[1])[:n, :k]


def fp8_state_dict(state: dict[str, torch.Tensor], block: tuple[int, int] = (BLOCK, BLOCK)) -> dict[str, torch.Tensor]:
    """An on-disk state dict (checkpoint.to_hf_state_dict) → DeepSeek's FP8 layout."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if quantizable(key, t):
            out[key], out[key + "_scale_inv"] = quantize_fp8(t, block)
        else:
            out[key] = t.contiguous()
    return out


def decode(key: str, get, qc: dict) -> torch.Tensor:
    """The float tensor `key` of an FP8 directory (`get(name)` reads a stored tensor)."""
    t = get(key)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return dequantize_fp8(t, get(key + "_scale_inv"), tuple(qc.get("weight_block_size", (BLOCK, BLOCK))))
    return t


def compress_fp8(cfg) -> dict:
    """`--method fp8`: the checkpoint rewritten in DeepSeek's FP8 layout."""
    from ..checkpoint import ckpt_flag, load_pretrained, to_hf_state_dict
    from .save import weight_bytes, write_quantized

    src = ckpt_flag(cfg.ckpt)
    model = load_pretrained(src)
    state = fp8_state_dict(to_hf_state_dict(model))
    write_quantized(src, model, state, dict(QUANTIZATION_CONFIG), cfg.out)
    n_fp8 = sum(t.numel() for t in state.values() if t.dtype == torch.float8_e4m3fn)
    return {"weights_fp8": n_fp8, "bytes": weight_bytes(Path(cfg.out)), "source_bytes": weight_bytes(src)}
