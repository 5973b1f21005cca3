"""The paged latent KV cache and its block manager (with the prefix cache).

What is stored: per layer and per token, the normalised latent c_kv [kv_lora_rank] and the
rotated rope key k_pe [qk_rope_head_dim] — nothing else (docs/deepseek.md, MLA). Both live side by side in
one tensor `kv` of shape (layers, num_blocks · block_size, rank + rope_dim), allocated once, so
that a write is one `index_copy_` and a read is one gather per layer.

Why pages: requests come and go with different lengths; fixed-size blocks handed out from a free
list let memory be shared without fragmentation, and a block that holds a full, known run of
prompt tokens can be shared by every request whose prompt starts the same way (prefix caching).

Slot 0..block_size-1 (block 0) is a scratch block never handed out: padded positions of a batch
write there, so padding can never touch a live request's latents.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PagedLatentCache:
    """One allocation for `num_blocks × block_size` tokens of every layer."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, rank: int, rope_dim: int,
                 dtype=torch.float32, device=None):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need at least 2 (block 0 is scratch)")
        self.n_layers, self.num_blocks, self.block_size = n_layers, num_blocks, block_size
        self.rank, self.rope_dim = rank, rope_dim
        self.kv = torch.zeros(n_layers, num_blocks * block_size, rank + rope_dim, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int, mtp_layers: int = 0) -> "PagedLatentCache":
        """The main model's layers, then `mtp_layers` MTP modules' (speculative decoding)."""
        c = model.config
        p = model.embed_tokens.weight
        return cls(c.num_hidden_layers + mtp_layers, num_blocks, block_size, c.kv_lora_rank, c.qk_rope_head_dim,
                   p.dtype, p.device)

    @property
    def bytes_per_token(self) -> int:
        """Read from the allocation itself: total bytes ÷ token slots."""
        return self.kv.numel() * self.kv.element_size() // (self.num_blocks * self.block_size)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size  # block 0 is scratch


class BlockManager:
    """Hands out blocks; ref-counts them; remembers full blocks by content for reuse.

    A full block is keyed by hash(parent block's key, its tokens), so a key names the whole
    prefix up to that block, not just its own tokens. A block whose last user leaves keeps its
    key and sits in an LRU list: still a hit for the next request, but the first thing reused
    when the free list runs dry.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() gives low ids first; 0 is scratch
        self.ref = [0] * num_blocks
        self.key_of: dict[int, int] = {}  # block → prefix key
        self.block_of: dict[int, int] = {}  # prefix key → block
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, oldest first

    # -------------------------------------------------------------- accounting
    @property
    def num_free(self) -> int:
        """Blocks an allocation can get: truly free + cached-but-unused (evictable)."""
        return len(self.free) + len(self.lru)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_free

    @staticmethod
    def key(parent: int | None, tokens) -> int:
        return hash((parent, tuple(tokens)))

    # -------------------------------------------------------------- allocation
    def allocate(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.lru:
            b, _ = self.lru.popitem(last=False)  # evict the least recently used cached block
            del self.block_of[self.key_of.pop(b)]
        else:
            raise RuntimeError("no free KV-cache blocks")
        self.ref[b] = 1
        return b

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.key_of:
                    self.lru[b] = None
                else:
                    self.free.append(b)

    # -------------------------------------------------------------- prefix cache
    def match(self, tokens: list[int], max_blocks: int) -> tuple[list[int], list[int]]:
        """Longest run of cached full blocks from token 0 (at most `max_blocks`): (blocks, keys).
        The blocks are ref'd for the caller."""
        blocks, keys, parent = [], [], None
        if not self.enable_prefix_cache:
            return blocks, keys
        bs = self.block_size
        for i in range(max_blocks):
            k = self.key(parent, tokens[i * bs:(i + 1) * bs])
            b = self.block_of.get(k)
            if b is None:
                break
            if self.ref[b] == 0:
                self.lru.pop(b, None)
            self.ref[b] += 1
            blocks.append(b)
            keys.append(k)
            parent = k
        return blocks, keys

    def register(self, block: int, key: int) -> None:
        """Remember a block whose latents are now fully written (first writer wins)."""
        if self.enable_prefix_cache and key not in self.block_of and block not in self.key_of:
            self.block_of[key] = block
            self.key_of[block] = key
