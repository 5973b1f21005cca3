"""The two small building blocks every DeepSeek layer uses: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x²) + ε) · g, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


class _RMSNorm(torch.autograd.Function):
    """y = g ⊙ x̂ with x̂ = x·r, r = 1/sqrt(mean(x²) + ε); backward by hand, since autograd's
    version of the five forward ops takes twice the passes over the activations:
    dg = Σ_rows dy ⊙ x̂,  dx = r·(dŷ − x̂·mean(dŷ ⊙ x̂)) with dŷ = dy ⊙ g."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        x_hat = xf * r
        ctx.save_for_backward(x_hat, r, weight)
        ctx.dtype = x.dtype
        return weight * x_hat.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x_hat, r, weight = ctx.saved_tensors
        d_weight = (dy * x_hat.to(ctx.dtype)).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        d_hat = (dy * weight).float()
        dx = (d_hat - x_hat * (d_hat * x_hat).mean(-1, keepdim=True)).mul_(r)
        return dx.to(ctx.dtype), d_weight, None


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) ⊙ up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
