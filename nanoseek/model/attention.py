"""Multi-head Latent Attention (DeepSeek-V2 paper §2.1, eqs. 9–19).

Keys and values are compressed jointly into a small latent c_kv = W_DKV·h (eq. 9); per-head keys
and values are up-projections of it (eqs. 10–11). Position goes through a separate, decoupled
RoPE key k_pe shared by all heads (eq. 14), so the latent itself stays position-free. What must be
cached per token is therefore only (c_kv, k_pe): kv_lora_rank + qk_rope_head_dim numbers.

Two ways to compute the same attention:
- expanded (training, prefill): up-project c_kv to K_nope and V for every head, run ordinary
  softmax attention with q = [q_nope; q_pe], k = [k_nope; k_pe].
- absorbed (decode over the latent cache): fold W_UK into the query, q_abs = q_nope·W_UK, score
  directly against c_kv, average c_kv with the softmax weights, and only then apply W_UV. No
  per-head K or V is ever materialised, which is what makes decoding cheap in memory traffic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm
from .rope import apply_rope


def stacked_linear(x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
    """The nn.Linear `layers` applied to the same x as one matmul; outputs concatenated."""
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.weight.new_zeros(layer.out_features) if layer.bias is None else layer.bias
                          for layer in layers])
    return F.linear(x, torch.cat([layer.weight for layer in layers]), bias)


class CausalAttention(torch.autograd.Function):
    """softmax(q·kᵀ·scale + mask)·v for q (B, H, T, d_qk), k (B, H, S, d_qk) and v (B, H, S, d_v),
    S ≥ T: the T queries are the last T positions, so query i sees keys 0 … S − T + i; an
    optional `key_bias` (B, S) of 0 / −inf also hides keys from every query of its row (a shared
    prompt's padding, in GRPO's update).

    Queries go in blocks of `block` rows, each scored only against the keys up to its own last
    row, so the all-masked upper-right of the score matrix is never computed (5/8 of the square
    is, at T = S = 4·block). The probabilities P are kept for backward, which is the textbook
    one: dV = Pᵀ·dO, dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O))·scale, dQ = dS·K, dK = dSᵀ·Q.
    Written out because MLA's d_qk ≠ d_v keeps PyTorch's CPU SDPA on its unfused math path,
    which scores, masks and differentiates the whole square.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, key_bias: torch.Tensor | None = None, block: int = 64):
        B, H, T, _ = q.shape
        S = k.shape[2]
        q, k, v = (t.reshape(B * H, t.shape[2], t.shape[-1]) for t in (q, k, v))
        out, probs = q.new_empty(B * H, T, v.shape[-1]), []
        for i in range(0, T, block):
            j = min(i + block, T)
            e = S - T + j  # queries i..j-1 see keys 0..e-1
            future = torch.ones(j - i, e, dtype=torch.bool, device=q.device).triu(S - T + i + 1)
            mask = torch.zeros(j - i, e, dtype=q.dtype, device=q.device).masked_fill_(future, float("-inf"))
            if key_bias is not None:
                mask = (mask + key_bias[:, None, None, :e].to(q.dtype)).expand(B, H, j - i, e).reshape(B * H, j - i, e)
            p = torch.baddbmm(mask, q[:, i:j], k[:, :e].transpose(1, 2), alpha=scale).softmax(dim=-1)
            torch.bmm(p, v[:, :e], out=out[:, i:j])
            probs.append(p)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.scale, ctx.block = scale, block
        return out.view(B, H, T, -1)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, *probs = ctx.saved_tensors
        shape = d_out.shape[:2]
        d_out = d_out.reshape(out.shape)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        rowsum = (d_out * out).sum(-1, keepdim=True)
        for i, p in zip(range(0, q.shape[1], ctx.block), probs):
            j, e = i + p.shape[1], p.shape[2]
            dv[:, :e] += torch.bmm(p.transpose(1, 2), d_out[:, i:j])  # (into a slice, bmm would go batch by batch)
            ds = torch.baddbmm(rowsum[:, i:j], d_out[:, i:j], v[:, :e].transpose(1, 2), beta=-1).mul_(p)
            torch.bmm(ds, k[:, :e], out=dq[:, i:j])
            dk[:, :e].add_(torch.bmm(ds.transpose(1, 2), q[:, i:j]), alpha=ctx.scale)
        dq *= ctx.scale
        return (dq.view(*shape, *dq.shape[1:]), dk.view(*shape, *dk.shape[1:]),
                dv.view(*shape, *dv.shape[1:]), None, None, None)


def causal_attention(q, k, v, scale: float, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the T queries q (B, H, T, ·) at the last T of the S keys (B, H, S, ·),
    `key_bias` (B, S) 0 / −inf hiding keys. CPU: the blocked CausalAttention above; CUDA: SDPA,
    whose fused kernels handle d_qk ≠ d_v without storing the probabilities."""
    if q.device.type == "cpu":
        return CausalAttention.apply(q, k, v, scale, key_bias)
    T, S = q.shape[2], k.shape[2]
    if key_bias is None and S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if key_bias is not None:
        mask = mask & (key_bias == 0)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = H = cfg.num_attention_heads
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        dq = self.dn + self.dr
        if cfg.q_lora_rank:  # low-rank query compression (eqs. 12–13)
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * dq, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, H * dq, bias=False)
        # W_DKV and W_KR stacked: rows [c_kv (kv_lora_rank); k_pe (qk_rope_head_dim)]
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.dr, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        # W_UK and W_UV stacked per head: rows [k_nope (dn); v (dv)]
        self.kv_b_proj = nn.Linear(self.rank, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale()

    # ------------------------------------------------------------------ projections
    def projections(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, ...]:
        """x (B, T, D) → q_nope (B, H, T, dn), rotated q_pe (B, H, T, dr), normalised latent
        c_kv (B, T, r) and rotated shared key k_pe (B, T, dr); the last two are all the cache stores.

        The query's first projection (W_DQ, or W_Q without q_lora) and [W_DKV; W_KR] both read x,
        so they run as one matmul over their stacked weights: one wide GEMM each way instead of
        two thin ones (the thin ones are the slowest matmuls of a training step on CPU).
        """
        B, T, _ = x.shape
        first = self.q_a_proj if hasattr(self, "q_a_proj") else self.q_proj
        q, c_kv, k_pe = stacked_linear(x, first, self.kv_a_proj_with_mqa).split(
            [first.out_features, self.rank, self.dr], dim=-1)
        if hasattr(self, "q_a_proj"):  # c_q → q (eq. 13)
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(B, T, self.n_heads, self.dn + self.dr).transpose(1, 2)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin), self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.rank)
        return w[:, : self.dn], w[:, self.dn :]  # W_UK (H, dn, r), W_UV (H, dv, r)

    # ------------------------------------------------------------------ the two attention paths
    def expanded(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None) -> torch.Tensor:
        """Ordinary attention over up-projected keys/values; `mask` None means causal."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(B, self.n_heads, S, self.dr)), dim=-1)
        if mask is None:
            out = causal_attention(q, k, v, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2).reshape(B, q.shape[2], self.n_heads * self.dv)

    def absorbed(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention computed in latent space (docs/deepseek.md, MLA); `mask` None means causal with the
        T queries at the last T of the S cached positions."""
        B, H, T, _ = q_nope.shape
        S = c_kv.shape[1]
        w_uk, w_uv = self._w_uk_uv()
        q_abs = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # absorb W_UK into the query
        scores = torch.einsum("bhtr,bsr->bhts", q_abs, c_kv) + torch.einsum("bhtd,bsd->bhts", q_pe, k_pe)
        scores = scores.float() * self.scale
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=c_kv.device).tril(S - T)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
        p = scores.softmax(dim=-1).to(c_kv.dtype)
        o_latent = torch.einsum("bhts,bsr->bhtr", p, c_kv)  # softmax-weighted latent
        out = torch.einsum("bhtr,hvr->bthv", o_latent, w_uv)  # then W_UV
        return out.reshape(B, T, H * self.dv)

    def forward(self, x: torch.Tensor, cos, sin, cache=None, mask: torch.Tensor | None = None,
                absorb: bool | None = None) -> torch.Tensor:
        """x (B, T, D) → (B, T, D).

        Without a cache: causal expanded attention (or `mask`: bool (B|1, 1, T, S), True = attend).
        With a cache: the new latents are appended through `cache.update(layer_idx, c_kv, k_pe)`,
        which returns all S cached latents of these sequences; attention is absorbed by default.
        """
        q_nope, q_pe, c_kv, k_pe = self.projections(x, cos, sin)
        if cache is not None:
            c_kv, k_pe = cache.update(self.layer_idx, c_kv, k_pe)
            absorb = True if absorb is None else absorb
        if absorb:
            out = self.absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            if mask is None and c_kv.shape[1] != x.shape[1]:
                T, S = x.shape[1], c_kv.shape[1]
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            out = self.expanded(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(out)
