"""A contiguous latent KV cache for one batch: the simplest thing absorbed decoding needs.

Per layer and token it stores the normalised latent c_kv and the rotated rope key k_pe — nothing
else (docs/deepseek.md, MLA). The engine uses a paged version of the same idea; this one backs
`DeepSeekV3.generate` and the tests that check the absorbed path against the expanded one.
"""

from __future__ import annotations

import torch


class DenseLatentCache:
    def __init__(self, n_layers: int, batch: int, max_len: int, rank: int, rope_dim: int,
                 dtype=torch.float32, device=None):
        self.c_kv = torch.zeros(n_layers, batch, max_len, rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n_layers, batch, max_len, rope_dim, dtype=dtype, device=device)
        self.seq_len = 0

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "DenseLatentCache":
        c = model.config
        p = model.embed_tokens.weight
        return cls(c.num_hidden_layers, batch, max_len, c.kv_lora_rank, c.qk_rope_head_dim, p.dtype, p.device)

    @property
    def bytes_per_token(self) -> int:
        n_layers, _, _, rank = self.c_kv.shape
        return n_layers * (rank + self.k_pe.shape[-1]) * self.c_kv.element_size()

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Write the T new tokens after the cached ones; return all cached latents of the layer."""
        T = c_kv.shape[1]
        end = self.seq_len + T
        if end > self.c_kv.shape[2]:
            raise ValueError(f"cache holds {self.c_kv.shape[2]} tokens; {end} requested")
        self.c_kv[layer, :, self.seq_len:end] = c_kv
        self.k_pe[layer, :, self.seq_len:end] = k_pe
        return self.c_kv[layer, :, :end], self.k_pe[layer, :, :end]

    def advance(self, T: int) -> None:
        self.seq_len += T
