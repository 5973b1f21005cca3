"""What a configuration costs: parameters (total and activated per token), training FLOPs per
token, and KV-cache bytes per token with MLA's latent cache versus an expanded MHA cache.

FLOPs per token are counted the usual way: 2 per activated matmul parameter in the forward
pass and 4 in the backward (6·N for training, 2·N for inference), plus causal attention's two
products per head — q·k over qk_head_dim and p·v over v_head_dim — against seq_len/2 keys on
average. The embedding lookup, norms, softmax and the router's top-k are not counted. The MTP
modules' share (their projection, block and the shared head's matmul) is counted apart, since
only a pretraining forward runs them. `nanoseek cost` turns these into accelerator-hours.

Counting is done on a model built on the `meta` device, so even the 671B preset is counted from
the real module tree in milliseconds and without memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import PRESETS, SET_HELP, ModelConfig, preset_with

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1, "int8": 1}


@dataclass
class Counts:
    total: int  # main model (MTP excluded, as DeepSeek reports 671B)
    activated: int  # what one token's forward pass uses: its embedding row, attention, dense FFN or
    #                 router + shared + top-k routed experts, the head (DeepSeek's "37B")
    mtp: int  # the MTP modules as stored on disk (with their copies of embedding and head)
    matmul_params: int  # activated parameters that are matmul weights (less the embedding row and norm gains)
    train_flops_per_token: float  # 6·matmul_params + attention, main model
    attention_flops_per_token: float  # the attention part of it (forward + backward)
    mtp_flops_per_token: float  # what the MTP modules add to a training token (0 without MTP)
    mla_cache_bytes: int  # per token, all layers
    mha_cache_bytes: int
    seq_len: int
    dtype: str


def count(cfg: ModelConfig, seq_len: int = 4096, dtype: str = "bfloat16") -> Counts:
    from .model import DeepSeekV3

    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    total = mtp_params = norms = mtp_norms = 0
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    unused = max(cfg.n_routed_experts - cfg.num_experts_per_tok, 0) * per_expert  # per MoE layer
    for name, p in model.named_parameters():
        is_norm = name.endswith("norm.weight")  # RMSNorm gains: elementwise, not matmuls
        if name.startswith("mtp."):
            mtp_params += p.numel()
            mtp_norms += p.numel() * is_norm
        else:
            total += p.numel()
            norms += p.numel() * is_norm
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    # a token touches one row of the embedding table, not all of it
    activated = total - n_moe * unused - (cfg.vocab_size - 1) * cfg.hidden_size
    D = cfg.num_nextn_predict_layers
    mtp = mtp_params + D * 2 * cfg.vocab_size * cfg.hidden_size  # stored copies of embedding and head
    matmul_params = activated - cfg.hidden_size - norms  # the embedding lookup is not a matmul
    # per layer and head: q·k over qk_head_dim and p·v over v_head_dim, on average seq_len/2 keys
    attn_layer = 6 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    attn = cfg.num_hidden_layers * attn_layer
    # an MTP module's matmuls: its projection and block (top-k experts) and the shared head again
    mtp_matmul = mtp_params - mtp_norms - D * (unused if cfg.is_moe_layer(cfg.num_hidden_layers) else 0) \
        + D * cfg.vocab_size * cfg.hidden_size
    mtp_flops = 6 * mtp_matmul + D * attn_layer
    b = DTYPE_BYTES[dtype]
    mla = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b
    mha = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * b
    return Counts(total, activated, mtp, matmul_params, 6 * matmul_params + attn, attn, mtp_flops, mla, mha,
                  seq_len, dtype)


def human(n: float) -> str:
    for unit, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.2f}{s}"
    return f"{n:.0f}"


@dataclass
class InfoConfig:
    preset: str | None = field(default=None, metadata={"help": f"a named preset: {', '.join(PRESETS)}"})
    ckpt: str | None = field(default=None, metadata={"help": "a checkpoint directory (reads its config.json), or any stage's run directory"})
    set: list[str] = field(default_factory=list, metadata={"help": "with --preset: " + SET_HELP, "repeatable": True})
    seq_len: int = field(default=4096, metadata={"help": "sequence length for the attention FLOPs"})
    dtype: str = field(default="bfloat16", metadata={"help": "cache dtype", "choices": list(DTYPE_BYTES)})

    def __post_init__(self):
        """Bad values are one line naming the flag, before any file is read."""
        model_flags(self.preset, self.ckpt)
        if self.set:
            if self.preset is None:
                raise ValueError(f"--set {' '.join(self.set)}: changes a --preset (a checkpoint's shape is its own)")
            preset_with(self.preset, self.set)
        if self.seq_len < 1:
            raise ValueError(f"--seq-len {self.seq_len}: must be ≥ 1")


def model_flags(preset_name: str | None, ckpt: str | None) -> None:
    """--preset NAME or --ckpt DIR, exactly one, each checked (shared by info and cost)."""
    if (preset_name is None) == (ckpt is None):
        raise ValueError("give exactly one of --preset NAME or --ckpt DIR")
    if preset_name is not None and preset_name not in PRESETS:
        raise ValueError(f"--preset {preset_name!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    if ckpt is not None:
        from .checkpoint import ckpt_flag

        ckpt_flag(ckpt)


def model_config(preset_name: str | None, ckpt: str | None, overrides: list[str] = ()) -> tuple[ModelConfig, str]:
    """The configuration --preset (with its --set ``overrides``) or --ckpt names (a run directory:
    its model/), and how to say it."""
    if preset_name:
        mc = preset_with(preset_name, list(overrides))
        return mc, f"preset {preset_name}" + "".join(f" --set {o}" for o in overrides)
    from .checkpoint import resolve_ckpt

    return ModelConfig.load(resolve_ckpt(ckpt) / "config.json"), ckpt


def info(cfg: InfoConfig) -> Counts:
    """Print parameters, FLOPs per token and KV-cache bytes per token (MLA vs MHA)."""
    mc, what = model_config(cfg.preset, cfg.ckpt, cfg.set)
    c = count(mc, cfg.seq_len, cfg.dtype)
    rows = [
        ("model", f"{what} ({mc.model_type})"),
        ("parameters, total", f"{human(c.total)} ({c.total:,})"),
        ("parameters, activated per token", f"{human(c.activated)} ({c.activated:,})"),
        ("MTP modules (on disk)", f"{human(c.mtp)} ({c.mtp:,})"),
        (f"training FLOPs per token (seq {c.seq_len})", f"{human(c.train_flops_per_token)} (6·N "
         f"{human(6 * c.matmul_params)} + attention {human(c.attention_flops_per_token)})"),
        ("  + MTP modules when they train", human(c.mtp_flops_per_token)),
        (f"KV cache per token, MLA latent ({c.dtype})", f"{c.mla_cache_bytes:,} bytes"),
        (f"KV cache per token, expanded MHA ({c.dtype})", f"{c.mha_cache_bytes:,} bytes"),
        ("MHA / MLA", f"{c.mha_cache_bytes / c.mla_cache_bytes:.1f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return c
