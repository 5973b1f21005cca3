"""The engine's matrices on integer CPU kernels: int8 per output channel, int4 per input group.

The engine (nanoseek/engine/paged_mla.py) folds norms and MLA's up-projections into new matrices
at load time; for an int8/int4 checkpoint each folded matrix is quantized again, with the
checkpoint's own scheme (quant.quantize), and packed for its kernel:

* int8 → fbgemm's `quantized::linear_dynamic`: int8 weights (one scale per output channel), the
  activations quantized to 8 bits per call (one scale per call), int32 accumulation — because
  torch's weight-only int8 kernel (`_weight_int8pack_mm`) does not beat the fp32 matmul on x86
  CPUs, while fbgemm's integer GEMM does (docs/compression.md);
* int4 → torch's `_weight_int4pack_mm_for_cpu`: weight-only, one scale per group of inputs, the
  activations in bf16 (the kernel's fast path), the result back in fp32.

The router (it picks experts by small margins), the embedding and the output head stay in fp32.
"""

from __future__ import annotations

import warnings

import torch

from .quant import group_for, quantize


class PackedLinear:
    """x (N, in) fp32 → x·Wᵀ (N, out) fp32 for a matrix packed for an integer kernel."""

    def __init__(self, w: torch.Tensor, bits: int, group_size: int | None = None):
        w = w.float().contiguous()
        self.out_features = w.shape[0]
        self.bits = bits
        if bits == 8:
            q, s = quantize(w, 8, None)
            s = s[:, 0].double()
            with warnings.catch_warnings():  # quantized tensors are only fbgemm's packing input here
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(q, s, torch.zeros_like(s, dtype=torch.long), 0)
                self.packed = torch.ops.quantized.linear_prepack(qw, None)
        else:
            self.group = group_size
            q, s = quantize(w, 4, group_size)
            pad = -self.out_features % 16  # the kernel packs rows in 16s
            qu = torch.nn.functional.pad(q.to(torch.int32) + 8, (0, 0, 0, pad), value=8)
            s = torch.nn.functional.pad(s, (0, 0, 0, pad))
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qu, 1)
            # (in/group, out, 2): w = (q_u − 8)·scale + zero, zero 0 (symmetric)
            self.scales_zeros = torch.stack((s, torch.zeros_like(s)), -1).transpose(0, 1).contiguous().bfloat16()

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return torch.ops.quantized.linear_dynamic(x, self.packed)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, self.group, self.scales_zeros)
        return y[:, :self.out_features].float()


def pack(w: torch.Tensor, spec: dict):
    """An engine matrix, stored transposed (in, out), → a PackedLinear; w itself where it stays
    fp32 (not an fp32 matrix, or for int4 an input width no group of 32 or more divides)."""
    if w.dim() != 2 or w.dtype != torch.float32:
        return w
    if spec["bits"] == 8:
        return PackedLinear(w.t(), 8)
    g = group_for(w.shape[0], spec["group_size"])
    return w if g is None or g < 32 else PackedLinear(w.t(), 4, g)


def pack_folded(paged, spec: dict) -> None:
    """Replace every folded matrix of a PagedMLA (attention, FFNs, experts, MTP's eh_proj) by its
    packed form; the router and the head stay as they are. These are CPU kernels: on another
    device (and for a model cast away from fp32) the dequantized matrices run as they are."""
    if paged.model.embed_tokens.weight.device.type != "cpu":
        return

    def layer(L: dict) -> None:
        for k in ("w_in", "wq", "wo", "gate_up", "down"):
            if L.get(k) is not None:
                L[k] = pack(L[k], spec)
        M = L.get("moe")
        if M is not None:
            for k in ("gu", "gate", "up", "down"):
                if M.get(k) is not None:
                    M[k] = [pack(w, spec) for w in M[k]]

    for L in paged.layers:
        layer(L)
    for M in paged.mtp:
        M["eh"] = pack(M["eh"], spec)
        layer(M["layer"])
