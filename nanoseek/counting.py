"""What a configuration costs: parameters (total and activated per token), training FLOPs per
token, and KV-cache bytes per token with MLA's latent cache versus an expanded MHA cache.

Counting is done on a model built on the `meta` device, so even the 671B preset is counted from
the real module tree in milliseconds and without memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import PRESETS, ModelConfig, preset

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1, "int8": 1}


@dataclass
class Counts:
    total: int  # main model (MTP excluded, as DeepSeek reports 671B)
    activated: int  # what one token's forward pass uses: its embedding row, attention, dense FFN or
    #                 router + shared + top-k routed experts, the head (DeepSeek's "37B")
    mtp: int  # the MTP modules as stored on disk (with their copies of embedding and head)
    train_flops_per_token: float
    mla_cache_bytes: int  # per token, all layers
    mha_cache_bytes: int
    seq_len: int
    dtype: str


def count(cfg: ModelConfig, seq_len: int = 4096, dtype: str = "bfloat16") -> Counts:
    from .model import DeepSeekV3

    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    total = mtp = inactive = 0
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    unused = max(cfg.n_routed_experts - cfg.num_experts_per_tok, 0)
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            mtp += p.numel()
        else:
            total += p.numel()
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    inactive = n_moe * unused * per_expert
    # a token touches one row of the embedding table, not all of it
    activated = total - inactive - (cfg.vocab_size - 1) * cfg.hidden_size
    mtp += cfg.num_nextn_predict_layers * 2 * cfg.vocab_size * cfg.hidden_size  # stored copies
    # 6·N per token for the matmuls (embedding lookup is not a matmul), plus causal attention:
    # per layer and head, q·k over qk_head_dim and p·v over v_head_dim, on average seq_len/2 keys.
    matmul_params = activated - cfg.hidden_size
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    b = DTYPE_BYTES[dtype]
    mla = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * b
    return Counts(total, activated, mtp, 6 * matmul_params + attn, mla, mha, seq_len, dtype)


def human(n: float) -> str:
    for unit, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.2f}{s}"
    return f"{n:.0f}"


@dataclass
class InfoConfig:
    preset: str | None = field(default=None, metadata={"help": f"a named preset: {', '.join(PRESETS)}"})
    ckpt: str | None = field(default=None, metadata={"help": "a checkpoint directory (reads its config.json), or any stage's run directory"})
    seq_len: int = field(default=4096, metadata={"help": "sequence length for the attention FLOPs"})
    dtype: str = field(default="bfloat16", metadata={"help": "cache dtype", "choices": list(DTYPE_BYTES)})

    def __post_init__(self):
        """Bad values are one line naming the flag, before any file is read."""
        if (self.preset is None) == (self.ckpt is None):
            raise ValueError("give exactly one of --preset NAME or --ckpt DIR")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
        if self.ckpt is not None:
            from .checkpoint import ckpt_flag

            ckpt_flag(self.ckpt)
        if self.seq_len < 1:
            raise ValueError(f"--seq-len {self.seq_len}: must be ≥ 1")


def info(cfg: InfoConfig) -> Counts:
    """Print parameters, FLOPs per token and KV-cache bytes per token (MLA vs MHA)."""
    if cfg.preset:
        mc = preset(cfg.preset)
        what = f"preset {cfg.preset}"
    else:
        from .checkpoint import resolve_ckpt

        mc = ModelConfig.load(resolve_ckpt(cfg.ckpt) / "config.json")  # a run directory: its model/
        what = cfg.ckpt
    c = count(mc, cfg.seq_len, cfg.dtype)
    rows = [
        ("model", f"{what} ({mc.model_type})"),
        ("parameters, total", f"{human(c.total)} ({c.total:,})"),
        ("parameters, activated per token", f"{human(c.activated)} ({c.activated:,})"),
        ("MTP modules (on disk)", f"{human(c.mtp)} ({c.mtp:,})"),
        (f"training FLOPs per token (seq {c.seq_len})", f"{human(c.train_flops_per_token)}"),
        (f"KV cache per token, MLA latent ({c.dtype})", f"{c.mla_cache_bytes:,} bytes"),
        (f"KV cache per token, expanded MHA ({c.dtype})", f"{c.mha_cache_bytes:,} bytes"),
        ("MHA / MLA", f"{c.mha_cache_bytes / c.mla_cache_bytes:.1f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return c
