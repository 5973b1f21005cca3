"""Rotary position embedding with YaRN context extension, as DeepSeek-V2/V3 use it.

RoPE (Su et al.) rotates each adjacent pair (x_{2i}, x_{2i+1}) of the decoupled rope dims by
angle p·θ_i. YaRN (Peng et al., 2023) keeps the high-frequency pairs (they see many full turns
within the original context), interpolates the low-frequency ones by `factor`, and blends
linearly in between; it also scales the attention logits by m² (see `ModelConfig.softmax_scale`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The pair index whose wavelength fits `num_rotations` turns into `max_pos` positions."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """θ_i for i < d/2 (YaRN-corrected when configured) and the cos/sin amplitude factor."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    theta = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    y = cfg.yarn
    if y is None:
        return theta, 1.0
    factor = y.get("factor") or cfg.max_position_embeddings / y["original_max_position_embeddings"]
    orig = y["original_max_position_embeddings"]
    beta_fast, beta_slow = y.get("beta_fast") or 32, y.get("beta_slow") or 1
    low = max(math.floor(_correction_dim(beta_fast, d, base, orig)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, d, base, orig)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # YaRN eq. (frequency blend): interpolate (θ/s) where ramp→1, keep θ where ramp→0
    theta = theta / factor * ramp + theta * (1 - ramp)

    def mscale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    m, m_all = y.get("mscale"), y.get("mscale_all_dim")
    amp = y.get("attention_factor")
    if amp is None:
        amp = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    return theta, float(amp)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; `forward(positions)` gathers them for arbitrary positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        theta, self.amplitude = inv_frequencies(cfg)
        self.register_buffer("theta", theta, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) → cos, sin each (B, T, d/2), in fp32."""
        angles = positions.to(torch.float32)[..., None] * self.theta
        return angles.cos() * self.amplitude, angles.sin() * self.amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (..., T, d) by the per-position angles; x is (B, H, T, d) or (B, T, d).

    Each pair (x_{2i}, x_{2i+1}) is the complex number x_{2i} + i·x_{2i+1}, so the rotation is one
    complex multiply by cos + i·sin. The rotated pairs are written as [evens; odds] (transformers'
    `rope_interleave` layout). Queries and keys get the same permutation, so q·k is exactly the
    pairwise RoPE score.
    """
    if x.dim() == 4:  # (B, H, T, d): broadcast the tables over heads
        cos, sin = cos[:, None], sin[:, None]
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or any(st % 2 for st in pairs.stride()[:-1]) or pairs.storage_offset() % 2:
        pairs = pairs.contiguous()  # view_as_complex needs (re, im) adjacent and aligned
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin))
    return rotated.transpose(-1, -2).flatten(-2).to(x.dtype)
