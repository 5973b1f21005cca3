"""The decode hot loop: one new token per sequence, absorbed MLA, with the weights pre-folded.

Decoding a small model on a CPU is bound by per-op overhead, not by FLOPs: a step of the module
forward launches ~250 small ops. This functional twin of `DeepSeekV3.hidden_states` (T = 1 only)
cuts that down without changing the math:

* W_UK is folded into the query up-projection once (q_abs = h·(W_UK^T W_Q,nope)^T), and W_UV into
  o_proj (W_O W_UV) — REFERENCE §4's absorption, done at load time instead of every step;
* the cache keeps [c_kv ; k_pe] side by side, so q_abs·c_kv + q_pe·k_pe is one batched matmul
  against the gathered latents: scores = [q_abs ; q_pe] · [c_kv ; k_pe]^T;
* the query and latent down-projections share one matmul; so do each SwiGLU's gate and up;
* a single token visits only its k routed experts.

Prefill keeps using the model's own (expanded) path; both write the same latent layout, and the
engine's greedy test against transformers checks that they agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.moe import MoE


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Same rotation and [evens; odds] layout as nanoseek.model.rope.apply_rope."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class FastDecoder:
    """Pre-folded weights of a DeepSeekV3 for T = 1 decoding over the paged latent cache."""

    @staticmethod
    def supports(model) -> bool:
        c = model.config
        return not c.attention_bias

    @torch.no_grad()
    def __init__(self, model):
        self.model = model
        c = self.cfg = model.config
        self.H, self.r, self.dr, self.dn, self.dv = (c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim,
                                                     c.qk_nope_head_dim, c.v_head_dim)
        self.layers = []
        for layer in model.layers:
            a = layer.self_attn
            H, r, dr, dn, dv = self.H, self.r, self.dr, self.dn, self.dv
            w_uk, w_uv = (w.double() for w in a._w_uk_uv())  # (H, dn, r), (H, dv, r)
            wq = (a.q_b_proj if hasattr(a, "q_b_proj") else a.q_proj).weight.double().view(H, dn + dr, -1)
            q_abs = torch.einsum("hdr,hdi->hri", w_uk, wq[:, :dn])  # (H, r, in): W_UK^T · W_Q,nope
            wq_fold = torch.cat((q_abs, wq[:, dn:]), dim=1).reshape(H * (r + dr), -1).to(a.kv_b_proj.weight.dtype)
            wo = a.o_proj.weight.double().view(-1, H, dv)
            wo_fold = torch.einsum("dhv,hvr->dhr", wo, w_uv).reshape(wo.shape[0], H * r).to(wq_fold.dtype)
            if hasattr(a, "q_a_proj"):
                w_in = torch.cat((a.q_a_proj.weight, a.kv_a_proj_with_mqa.weight))
                split = [a.q_a_proj.weight.shape[0], r + dr]
            else:
                w_in = torch.cat((wq_fold, a.kv_a_proj_with_mqa.weight))
                split = [H * (r + dr), r + dr]
            mlp = layer.mlp
            ffn = mlp.shared_experts if isinstance(mlp, MoE) else mlp
            self.layers.append(dict(
                ln1=layer.input_layernorm, ln2=layer.post_attention_layernorm, w_in=w_in.contiguous(), split=split,
                q_norm=getattr(a, "q_a_layernorm", None), wq=wq_fold.contiguous() if hasattr(a, "q_a_proj") else None,
                kv_norm=a.kv_a_layernorm, wo=wo_fold.contiguous(), scale=a.scale,
                moe=mlp if isinstance(mlp, MoE) else None,
                # experts' gate and up stacked: one matmul instead of two per expert; a copy, so
                # only when the copy is small (laptop-sized models)
                experts_gu=torch.cat((mlp.experts.gate_proj, mlp.experts.up_proj), dim=1)
                if isinstance(mlp, MoE) and mlp.experts.gate_proj.numel() * 2 <= 64 * 2**20 else None,
                gate_up=None if ffn is None else torch.cat((ffn.gate_proj.weight, ffn.up_proj.weight)).contiguous(),
                down=None if ffn is None else ffn.down_proj.weight))

    @staticmethod
    def _norm(x, norm):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).to(x.dtype) * norm.weight

    @staticmethod
    def _swiglu(x, gate_up, down):
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down)

    def _moe(self, x: torch.Tensor, moe: MoE, gate_up: torch.Tensor | None) -> torch.Tensor:
        w, idx, _ = moe.gate(x)
        ex = moe.experts
        if x.shape[0] == 1:  # one token: visit only its k experts
            y = None
            for j, e in enumerate(idx[0].tolist()):
                h = F.silu(F.linear(x, ex.gate_proj[e])) * F.linear(x, ex.up_proj[e])
                o = F.linear(h, ex.down_proj[e]) * w[0, j].to(x.dtype)
                y = o if y is None else y + o
            return y
        if gate_up is None:
            return ex(x, w, idx)
        N, k = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert, as Experts.forward
        token = order // k
        xs = x.index_select(0, token).split(torch.bincount(flat, minlength=gate_up.shape[0]).tolist())
        outs = [F.linear(self._swiglu_h(xe, gate_up[e]), ex.down_proj[e]) for e, xe in enumerate(xs) if xe.shape[0]]
        y = torch.cat(outs) * w.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, y)

    @staticmethod
    def _swiglu_h(x, gate_up):
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.silu(g) * u

    def hidden(self, ids: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor, write: torch.Tensor,
               table: torch.Tensor, block_size: int) -> torch.Tensor:
        """ids, pos, write (B,) · kv the cache (L, slots, r+dr) · table (B, nb) block ids
        → final hidden states (B, D), before the last norm.

        Latents are gathered a whole block at a time (one index per block, not per token: the
        per-token gather was the costliest op of a batched decode step)."""
        S = table.shape[1] * block_size
        mask = torch.arange(S, device=ids.device)[None] <= pos[:, None]
        flat = table.reshape(-1)
        m, H, r, dr = self.model, self.H, self.r, self.dr
        B = ids.shape[0]
        cos, sin = m.rotary(pos)  # (B, dr/2)
        h = F.embedding(ids, m.embed_tokens.weight)
        neg = torch.zeros(mask.shape, dtype=torch.float32, device=h.device).masked_fill_(~mask, float("-inf"))[:, None]
        for i, L in enumerate(self.layers):
            x = self._norm(h, L["ln1"])
            a, lat = F.linear(x, L["w_in"]).split(L["split"], dim=-1)
            q = F.linear(self._norm(a, L["q_norm"]), L["wq"]) if L["q_norm"] is not None else a
            q = q.view(B, H, r + dr)
            q = torch.cat((q[..., :r], _rope(q[..., r:], cos[:, None], sin[:, None])), dim=-1)
            new = torch.cat((self._norm(lat[:, :r], L["kv_norm"]), _rope(lat[:, r:], cos, sin)), dim=-1)
            cache = kv[i]
            cache.index_copy_(0, write, new.to(cache.dtype))
            # index_select on whole blocks: ~7x faster than advanced indexing on CPU
            lat_all = cache.view(-1, block_size * (r + dr)).index_select(0, flat).view(B, S, r + dr)
            scores = torch.baddbmm(neg, q, lat_all.transpose(1, 2), alpha=L["scale"]) if q.dtype == torch.float32 \
                else (torch.bmm(q, lat_all.transpose(1, 2)).float() * L["scale"] + neg)
            p = scores.softmax(-1).to(lat_all.dtype)
            o = torch.bmm(p, lat_all[..., :r])  # (B, H, r): the softmax-weighted latent
            h = h + F.linear(o.reshape(B, H * r), L["wo"])
            x = self._norm(h, L["ln2"])
            if L["moe"] is not None:
                y = self._moe(x, L["moe"], L["experts_gu"])
                h = h + (y + self._swiglu(x, L["gate_up"], L["down"]) if L["gate_up"] is not None else y)
            else:
                h = h + self._swiglu(x, L["gate_up"], L["down"])
        return h
