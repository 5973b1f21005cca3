"""Multi-token prediction (V3 paper §2.2, eqs. 21–25).

Module k keeps the causal chain: at position i it combines the previous depth's representation
h^{k-1}_i with the embedding of token t_{i+k}, runs one transformer block, and predicts t_{i+k+1}
through the output head shared with the main model:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]          (eq. 21; the released
    h^k    = TRM_k(h'^k)                                               weights put the embedding
    P^k    = OutHead(h^k)                                              half first)

Embedding and head are shared with the main model, so in memory the module owns only its norms,
the projection M_k and the block; checkpoints also store copies of the shared tensors under the
module's own names, as DeepSeek's released weights do.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        from .model import DecoderLayer  # the block is an ordinary decoder layer

        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, layer_idx)
        self.shared_head_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, next_tokens: torch.Tensor, embed: nn.Embedding,
                rotary: nn.Module, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """h_prev (B, T', D) at `positions` (default 0..T'-1), next_tokens (B, T') = t_{i+k} →
        h^k (B, T', D); `mask` (bool (B, 1, T', T')) as the main model's, default causal."""
        B, T = next_tokens.shape
        e = self.enorm(embed(next_tokens))
        h = self.eh_proj(torch.cat([e, self.hnorm(h_prev)], dim=-1))
        if positions is None:
            positions = torch.arange(T, device=h.device).expand(B, T)
        cos, sin = rotary(positions)
        return self.block(h, cos, sin, mask=mask)

    def shared_head_logits(self, h: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
        return lm_head(self.shared_head_norm(h))
