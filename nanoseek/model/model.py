"""The DeepSeek-V3 decoder: embeddings → L × (MLA + dense FFN or DeepSeekMoE) → norm → head,
with D multi-token-prediction modules beside it for training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import MLA
from .layers import MLP, RMSNorm
from .moe import MoE
from .mtp import MTPModule
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: h = h + MLA(norm(h)); h = h + FFN(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, cache=None, mask=None, absorb=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache=cache, mask=mask, absorb=absorb)
        return h + self.mlp(self.post_attention_layernorm(h))


@dataclass
class Output:
    """What a training forward returns. `loss` is what to backpropagate."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    balance_loss: torch.Tensor | None
    logits: torch.Tensor | None = None


class DeepSeekV3(nn.Module):
    """`model(input_ids)` → logits (B, T, vocab); `model(input_ids, targets)` → Output with the loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for matrices (V3 trains with std 0.006), ones for norms."""
        std = self.config.initializer_range
        for p in self.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.zero_()
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    # ------------------------------------------------------------------ forward
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def hidden_states(self, input_ids, positions=None, cache=None, mask=None, absorb=None) -> torch.Tensor:
        """Final-layer hidden states before the last norm, (B, T, D)."""
        B, T = input_ids.shape
        if positions is None:
            start = cache.seq_len if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        if int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(positions.max())} is beyond max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        cos, sin = self.rotary(positions)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, cache=cache, mask=mask, absorb=absorb)
        if cache is not None and hasattr(cache, "advance"):
            cache.advance(T)
        return h

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions=None, cache=None, mask=None, absorb=None, logits_to_keep: int = 0,
                mtp_weight: float = 0.3, balance_alpha: float = 0.0, ignore_index: int = -100):
        """Without targets: logits (B, T, V) in fp32 (the last `logits_to_keep` positions if > 0).

        With targets (B, T), aligned so targets[:, i] is the token after input_ids[:, i]
        (-100 = ignore): an `Output` whose loss = L_main + λ·L_MTP + α·L_Bal (V3 eqs. 20, 25).
        """
        h = self.hidden_states(input_ids, positions, cache, mask, absorb)
        if targets is None:
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
            return self.lm_head(self.norm(h)).float()
        logits = self.lm_head(self.norm(h))
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
        loss = lm_loss
        mtp_loss = None
        if self.mtp and mtp_weight:
            mtp_loss = self.mtp_loss(h, input_ids, targets, positions, mask, ignore_index)
            if mtp_loss is not None:
                loss = loss + mtp_weight * mtp_loss
        balance = None
        ran = list(self.layers) + ([m.block for m in self.mtp] if mtp_loss is not None else [])
        moes = [layer.mlp for layer in ran if isinstance(layer.mlp, MoE)]  # the MoEs this forward used
        if moes and self.training:
            balance = torch.stack([m.balance_loss for m in moes]).mean()
            if balance_alpha:
                loss = loss + balance_alpha * balance
        return Output(loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, balance_loss=balance, logits=logits)

    def mtp_loss(self, h: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor, positions=None, mask=None,
                 ignore_index: int = -100, reuse: int = 0, train_shared: bool = True) -> torch.Tensor | None:
        """L_MTP = 1/D · Σ_k CE_k (eq. 25, before λ) from the main model's final hidden states h
        (B, T, D): module k sees h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1} (targets[:, i+k]).

        `positions` and a bool `mask` (B, 1, T, T) are the main forward's (packed sequences: each
        restarts at 0 and attends within itself); a pair whose h^{k-1}_i and t_{i+k} lie in
        different sequences (mask[i+k, i] false) predicts nothing. `reuse` > 0 adds that many
        depths of the last module fed its own output — how speculative decoding drafts past the
        D modules — to the mean. `train_shared=False` reads the embedding and the output head
        (shared with the main model) without gradient: only the modules' own weights learn.
        None when T ≤ 1."""
        losses, hk = [], h
        embed, head = self.embed_tokens, self.lm_head
        if not train_shared:
            w_e, w_h = self.embed_tokens.weight.detach(), self.lm_head.weight.detach()
            embed, head = (lambda t: F.embedding(t, w_e)), (lambda x: F.linear(x, w_h))
        T = input_ids.shape[1]
        modules = list(self.mtp) + [self.mtp[-1]] * reuse if self.mtp else []
        for k, module in enumerate(modules, start=1):
            if T <= k:
                break
            n = T - k  # module k's sequence: indices 0 … T−k−1
            tk = targets[:, k:]
            if mask is not None:
                same = mask[:, 0].diagonal(-k, dim1=-2, dim2=-1)  # (B, n): mask[b, i+k, i]
                tk = tk.masked_fill(~same, ignore_index)
            hk = module(hk[:, :-1], input_ids[:, k:], embed, self.rotary,
                        positions=None if positions is None else positions[:, :n],
                        mask=None if mask is None else mask[..., :n, :n])
            lk = module.shared_head_logits(hk, head)
            losses.append(F.cross_entropy(lk.flatten(0, 1).float(), tk.flatten(), ignore_index=ignore_index))
        return torch.stack(losses).mean() if losses else None

    @torch.no_grad()
    def update_router_bias(self, gamma: float) -> list[float]:
        """After each optimizer step: bias update on every MoE layer; returns per-layer max violation."""
        return [m.update_bias(gamma) for m in self.moe_layers()]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 cache: bool = True) -> torch.Tensor:
        """Plain greedy decoding for a (B, T) batch of equal-length prompts, over the latent cache.

        The engine (nanoseek.engine) is the fast, batched, sampled way; this is the reference.
        """
        from .cache import DenseLatentCache

        self.eval()
        B, T = input_ids.shape
        kv = DenseLatentCache.for_model(self, B, T + max_new_tokens) if cache else None
        out = input_ids
        step_in = input_ids
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(step_in if cache else out, cache=kv, logits_to_keep=1)[:, -1]
            nxt = logits.argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            step_in = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        return out
