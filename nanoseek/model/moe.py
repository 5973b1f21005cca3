"""DeepSeekMoE: shared experts plus fine-grained routed experts (V3 paper §2.1.2, eqs. 12–16).

h' = h + Σ_shared FFN_s(h) + Σ_routed g_i · FFN_i(h)

The V3 router scores experts with a sigmoid, picks the top-k after adding a per-expert bias
b_i that exists only to steer *selection* (auxiliary-loss-free balancing, eq. 16): the gate
values g_i come from the unbiased scores. Between steps the bias is nudged by γ against each
expert's load, so balance is kept without a loss term that fights the language-model objective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP


class Router(nn.Module):
    """The gate: chooses num_experts_per_tok experts per token and their weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":  # b_i: fp32, never receives gradient
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) → weights (N, k) fp32, expert ids (N, k), scores (N, E) fp32 (unbiased)."""
        return self.route(F.linear(x.float(), self.weight.float()))

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits u_tᵀe_i (N, E) fp32 → the gate values g_i,t (N, k) of the chosen experts
        (N, k), and the unbiased affinities s (N, E). The engine calls this on logits it computes
        with the input norm's gain folded into the weight."""
        c = self.cfg
        s = self.scores(logits)
        idx = self.select(s)
        w = s.gather(1, idx)  # g'_i from the *unbiased* scores
        if c.norm_topk_prob:
            # g_i = g'_i / Σ_j g'_j (eq. 13), for k = 1 too (then g = 1); the floor only guards 0/0 (a clamp: + ε would cost the
            # engine's one-token step a scalar tensor, and equals the clamp for any sum above ~1e-13)
            w = w / w.sum(dim=-1, keepdim=True).clamp_min_(1e-20)
        return (w * c.routed_scaling_factor if c.routed_scaling_factor != 1.0 else w), idx, s

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Router logits u_tᵀe_i (N, E) fp32 → affinities s_i,t."""
        if self.cfg.scoring_func == "sigmoid":
            return logits.sigmoid()  # s_i,t = σ(u_tᵀ e_i)  (eq. 15)
        return logits.softmax(dim=-1)  # V2: s_i,t = Softmax_i(u_tᵀ e_i)

    def select(self, s: torch.Tensor) -> torch.Tensor:
        """Affinities (N, E) → the chosen experts (N, k): top-k of s + b_i (eq. 16) within the
        best `topk_group` groups."""
        c = self.cfg
        choice = s + self.e_score_correction_bias if hasattr(self, "e_score_correction_bias") else s
        if c.topk_method in ("noaux_tc", "group_limited_greedy") and c.n_group > 1:
            groups = choice.view(-1, c.n_group, c.n_routed_experts // c.n_group)
            if c.topk_method == "noaux_tc":  # V3: a group scores the sum of its top-2 experts
                group_score = groups.topk(2, dim=-1).values.sum(-1)
            else:  # V2: a group scores its best expert
                group_score = groups.amax(dim=-1)
            keep = group_score.topk(c.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = groups.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        return choice.topk(c.num_experts_per_tok, dim=-1).indices


class Experts(nn.Module):
    """All routed experts' SwiGLU weights, stacked (E, ·, ·) so dispatch is one sort, not a token loop.

    On disk each expert is `experts.{e}.{gate,up,down}_proj.weight` (checkpoint.py splits/stacks).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, D), weights/ids (N, k) → Σ_k w_k · FFN_{idx_k}(x), grouped by expert."""
        N, k = idx.shape
        E = self.gate_proj.shape[0]
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # the N·k (token, slot) pairs, grouped by expert
        token, wt = order // k, w.flatten()[order]
        counts = torch.bincount(flat, minlength=E)
        if pad := self.row_multiple(x):
            token, wt, counts = _pad_groups(token, wt, counts, pad)
        counts = counts.tolist()
        xs, ws, tokens = x[token].split(counts), wt[:, None].to(x.dtype).split(counts), token.split(counts)
        out = torch.zeros_like(x)
        for e, (xe, we, te) in enumerate(zip(xs, ws, tokens)):
            if xe.shape[0]:
                h = F.silu(xe @ self.gate_proj[e].t()) * (xe @ self.up_proj[e].t())
                # g_i scales the (narrower) hidden state, then each row lands on its token
                # (under autocast the product is bf16; the sum over experts stays in x's dtype)
                out.index_add_(0, te, ((h * we) @ self.down_proj[e].t()).to(out.dtype))
        return out

    @staticmethod
    def row_multiple(x: torch.Tensor) -> int:
        """Pad each expert's rows to a multiple of this (0 = no padding). bf16 GEMMs on CPU go
        through oneDNN, which builds a kernel for every new shape: with routing, every step brings
        new row counts and pays for new kernels (docs/benchmarks.md, Train). Rounded to 64 rows,
        the shapes repeat and are cached; the padding rows carry gate weight 0, so they add exact
        zeros."""
        cpu_bf16 = x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")
        return 64 if x.device.type == "cpu" and cpu_bf16 else 0


def _pad_groups(token, wt, counts, m):
    """Sorted (token, weight) pairs in groups of `counts` → the same groups, each padded with
    (token 0, weight 0) rows to a multiple of m."""
    padded = (counts + m - 1) // m * m
    start, pstart = counts.cumsum(0) - counts, padded.cumsum(0) - padded
    group = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    slot = pstart[group] + torch.arange(len(token), device=token.device) - start[group]
    total = int(padded.sum())
    token_p = torch.zeros(total, dtype=token.dtype, device=token.device).index_copy_(0, slot, token)
    wt_p = torch.zeros(total, dtype=wt.dtype, device=wt.device).index_copy(0, slot, wt)  # out of place: wt carries the router's gradient
    return token_p, wt_p, padded


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts else None
        # statistics for balancing, filled during forward (no grad)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        w, idx, s = self.gate(flat)
        y = self.experts(flat, w, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(idx.flatten(), minlength=s.shape[1]).float()
            self.balance_loss = self.sequence_balance_loss(s.view(B, T, -1), idx.view(B, T, -1))
        return y.view(B, T, D)

    def sequence_balance_loss(self, s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Complementary sequence-wise balance loss (V3 eqs. 17–20), before the α factor.

        f_i = N_r/(K_r·T) Σ_t 1[i ∈ TopK_t],  P_i = 1/T Σ_t s'_i,t with s' = s/Σ_j s_j,
        L_Bal = Σ_i f_i P_i, averaged over the sequences of the batch.
        """
        B, T, E = s.shape
        K = idx.shape[-1]
        hits = torch.zeros(B, E, device=s.device).scatter_add_(1, idx.reshape(B, -1),
                                                             torch.ones(B, T * K, device=s.device))
        f = hits * E / (K * T)
        P = (s / s.sum(-1, keepdim=True)).mean(1)
        return (f * P).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> float:
        """Auxiliary-loss-free balancing: b_i −= γ if expert i was overloaded, += γ if underloaded.

        Uses the loads counted since the last call (all ranks summed under torch.distributed),
        resets them, and returns this layer's max violation = max_load / mean_load − 1.
        """
        load = self.tokens_per_expert.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        self.tokens_per_expert.zero_()
        if load.sum() == 0:
            return 0.0
        mean = load.mean()
        if gamma and hasattr(self.gate, "e_score_correction_bias"):
            self.gate.e_score_correction_bias += gamma * torch.sign(mean - load)
        return float(load.max() / mean - 1)
