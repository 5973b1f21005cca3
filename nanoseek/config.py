"""ModelConfig: the DeepSeek-V3 configuration under transformers' `deepseek_v3` field names.

The field names are exactly those of a Hugging Face `config.json`, so a checkpoint directory
written by nanoseek is read by `transformers.AutoConfig` as it is, and theirs by us. Two fields
choose the routing (`scoring_func`, `topk_method`): V3 is always sigmoid + noaux_tc (transformers
assumes it and ignores them), V2 softmax + greedy or group-limited; `model_type` says which
family a directory belongs to. config.json carries them for V3 too, as DeepSeek's own does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# shape-giving fields: a config.json must name them (defaults would silently describe the 671B model)
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts")
POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")


# The rest of the fields DeepSeek's released V3 config.json carries: choices nanoseek's model
# always makes (every layer past first_k_dense_replace is MoE, no attention dropout, no tensor or
# expert parallelism baked into the weights) and the sequence-wise balance loss DeepSeek's modeling
# code trains with (eqs. 17–20, α = nanoseek's default --balance-alpha). Written so that every
# consumer of a config.json finds what it finds in DeepSeek's; a file that says otherwise for
# moe_layer_freq describes a different model and is refused.
FIXED_HF_FIELDS = {"moe_layer_freq": 1, "attention_dropout": 0.0, "ep_size": 1, "pretraining_tp": 1,
                   "seq_aux": True, "aux_loss_alpha": 1e-4}


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"  # or "deepseek_v2" (softmax routing, no bias)
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (the first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of one routed (fine-grained) expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA: every head has its own K/V, expanded from the latent
    # MLA (DeepSeek-V2 paper, §2.1): low-rank joint KV compression, optional low-rank q
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # decoupled RoPE key, shared by all heads
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    scoring_func: str = "sigmoid"  # V2: "softmax"
    topk_method: str = "noaux_tc"  # V2: "greedy" | "group_limited_greedy"
    # multi-token prediction (V3 paper §2.2)
    num_nextn_predict_layers: int = 1
    # positions
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True
    # the rest
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_v2(self) -> bool:
        return self.model_type == "deepseek_v2"

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"invalid ModelConfig: {msg}")

        if self.model_type not in ("deepseek_v3", "deepseek_v2"):
            bad(f"model_type must be deepseek_v3 or deepseek_v2, got {self.model_type!r}")
        # sizes first: a zero, negative or non-integer size would fail deep inside a module's
        # construction (or, for a huge one, only after allocating it)
        for name in POSITIVE_INTS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f"{name} must be a positive integer, got {v!r}")
        for name in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(f"{name} must be an integer ≥ 0, got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            bad(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.n_routed_experts:
            for name in ("moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    bad(f"{name} must be a positive integer with routed experts, got {v!r}")
        for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                bad(f"{name} must be a finite number > 0, got {v!r}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad(f"scoring_func must be sigmoid or softmax, got {self.scoring_func!r}")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            bad(f"unknown topk_method {self.topk_method!r}")
        if not self.is_v2 and (self.scoring_func, self.topk_method) != ("sigmoid", "noaux_tc"):
            bad(f"deepseek_v3 routes with scoring_func='sigmoid', topk_method='noaux_tc' (got "
                f"{self.scoring_func!r}, {self.topk_method!r}); other routings are deepseek_v2")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim must be even (RoPE rotates pairs)")
        if self.n_routed_experts:
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                bad(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                bad(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.num_experts_per_tok > self.n_routed_experts // self.n_group * self.topk_group:
                bad("num_experts_per_tok exceeds the experts available in topk_group groups")
        if self.hidden_act != "silu":
            bad(f"only hidden_act='silu' is supported, got {self.hidden_act!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                bad(f"unsupported rope_scaling type {kind!r} (nanoseek implements YaRN)")

    # ------------------------------------------------------------------ YaRN helpers
    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters, or None when RoPE is plain."""
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) in ("default", None):
            return None
        return rs

    def softmax_scale(self) -> float:
        """qk_head_dim^-1/2, times m^2 with m = 0.1·mscale_all_dim·ln(factor) + 1 under YaRN."""
        scale = self.qk_head_dim**-0.5
        y = self.yarn
        if y and y.get("mscale_all_dim") and y["factor"] > 1:
            m = 0.1 * y["mscale_all_dim"] * math.log(y["factor"]) + 1.0
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ (de)serialisation
    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers expects (legacy rope_theta/rope_scaling, as DeepSeek ships)."""
        d = dataclasses.asdict(self)
        arch = "DeepseekV2ForCausalLM" if self.is_v2 else "DeepseekV3ForCausalLM"
        d["architectures"] = [arch]
        d["num_key_value_heads"] = self.num_attention_heads
        d["use_cache"] = True
        # scoring_func/topk_method are kept although transformers' V3 ignores them: DeepSeek's own
        # config.json carries them, and converters (llama.cpp's) read the gating from them
        d.update(FIXED_HF_FIELDS)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        # transformers 5 writes rope_parameters; DeepSeek's own files use rope_theta + rope_scaling
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default" and not d.get("rope_scaling"):
                rp["type"] = kind
                rp.pop("rope_type", None)
                d["rope_scaling"] = rp
        if d.get("rope_scaling"):
            rs = dict(d["rope_scaling"])
            if "rope_type" in rs and "type" not in rs:
                rs["type"] = rs.pop("rope_type")
            d["rope_scaling"] = rs
        if d.get("model_type") == "deepseek_v2":
            d.setdefault("scoring_func", "softmax")
            d.setdefault("topk_method", "greedy")
            d.setdefault("norm_topk_prob", False)
            d.setdefault("n_group", d.get("n_group") or 1)
            d.setdefault("topk_group", d.get("topk_group") or 1)
            d.setdefault("num_nextn_predict_layers", 0)
            for k in ("n_group", "topk_group"):
                if d.get(k) is None:
                    d[k] = 1
        if "n_routed_experts" in d and d["n_routed_experts"] is None:  # transformers' spelling of "dense"
            d["n_routed_experts"] = 0
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if d.get("model_type", "deepseek_v3") not in ("deepseek_v3", "deepseek_v2"):
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not a DeepSeek-V2/V3 model")
        if d.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"{source}: moe_layer_freq={d['moe_layer_freq']!r}; nanoseek's DeepSeek-V3 makes every "
                             "layer from first_k_dense_replace on an MoE layer (moe_layer_freq 1)")
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        if d.get("torch_dtype") is None:
            d["torch_dtype"] = d.get("dtype") or "float32"
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json here") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: must hold a JSON object, got {type(d).__name__}")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{path}: lacks required field(s) {', '.join(missing)} (a deepseek_v3 config.json "
                             "names every size)")
        return cls.from_hf_dict(d, source=str(path))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- presets
def _yarn_4k_to_160k(mscale: float) -> dict:
    """DeepSeek's released YaRN: a 4K pretraining context stretched 40× (V2 and V3 differ in mscale)."""
    return {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale}


def _v3_671b() -> ModelConfig:
    return ModelConfig(
        max_position_embeddings=163840,
        rope_scaling=_yarn_4k_to_160k(mscale=1.0),
        torch_dtype="bfloat16",
    )


def _v2_lite() -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v2",
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        first_k_dense_replace=1,
        scoring_func="softmax",
        topk_method="greedy",
        num_nextn_predict_layers=0,
        max_position_embeddings=163840,
        rope_scaling=_yarn_4k_to_160k(mscale=0.707),
        bos_token_id=100000,
        eos_token_id=100001,
        torch_dtype="bfloat16",
    )


def _tiny() -> ModelConfig:
    """For tests: every feature on (q low-rank, groups, MTP), well under 1M parameters."""
    return ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=256,
        initializer_range=0.02,
    )


def _small() -> ModelConfig:
    """The CPU demo model: MLA + fine-grained MoE + MTP that two cores train usefully in minutes."""
    return ModelConfig(
        vocab_size=2048,
        hidden_size=192,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        # 32 rope dims, not 16: the demo's arithmetic needs fine positional lookups (copying the
        # k-th digit of each operand); measured 92% vs 33.5% held-out addition, same 2.9M tokens
        qk_rope_head_dim=32,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=512,
        initializer_range=0.02,
    )


def _v3_scaled(hidden: int, layers: int, heads: int, experts: int, vocab: int, q_rank: int, kv_rank: int,
               head_dim: int, rope_dim: int, dense_ffn: int, expert_ffn: int, context: int) -> ModelConfig:
    """A DeepSeek-V3 of another size, every feature as V3 has it: MLA with low-rank q and kv,
    sigmoid-routed fine-grained experts (8 per token, in 8 groups of which 4 are searched, as
    V3), one shared expert, the first layer dense, one MTP module, V3's routed scaling 2.5."""
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=dense_ffn, moe_intermediate_size=expert_ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        q_lora_rank=q_rank, kv_lora_rank=kv_rank, qk_nope_head_dim=head_dim, qk_rope_head_dim=rope_dim,
        v_head_dim=head_dim, n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=8,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=context, initializer_range=0.02)


def _v3_15m() -> ModelConfig:
    return _v3_scaled(hidden=256, layers=6, heads=4, experts=32, vocab=8192, q_rank=128, kv_rank=64,
                      head_dim=32, rope_dim=32, dense_ffn=768, expert_ffn=72, context=1024)


def _v3_60m() -> ModelConfig:
    return _v3_scaled(hidden=512, layers=8, heads=8, experts=32, vocab=16384, q_rank=256, kv_rank=128,
                      head_dim=64, rope_dim=32, dense_ffn=1536, expert_ffn=96, context=2048)


def _v3_250m() -> ModelConfig:
    return _v3_scaled(hidden=768, layers=12, heads=12, experts=48, vocab=32768, q_rank=384, kv_rank=256,
                      head_dim=64, rope_dim=32, dense_ffn=2048, expert_ffn=128, context=4096)


def _dense(base: ModelConfig, **sizes: Any) -> ModelConfig:
    """A distillation student: `base`'s attention (MLA) with every layer a dense FFN
    (first_k_dense_replace = num_hidden_layers) and no MTP module. It is still a `deepseek_v3`
    config, so transformers, the engine and every nanoseek command load it as any checkpoint;
    the router fields stay as they are and build nothing."""
    cfg = base.replace(num_nextn_predict_layers=0, **sizes)
    return cfg.replace(first_k_dense_replace=cfg.num_hidden_layers)


def _dense_tiny() -> ModelConfig:
    """For tests: a student for `tiny` teachers."""
    return _dense(_tiny(), num_hidden_layers=2, intermediate_size=128)


def _dense_small() -> ModelConfig:
    """The demo's student: 0.31× the total parameters of `small` (most of what is left is the
    2048-token embedding and head), all four layers dense."""
    return _dense(_small(), hidden_size=112, intermediate_size=256, q_lora_rank=64)


def _dense_base() -> ModelConfig:
    """`small`'s width and depth, every layer dense: about 0.7× its total parameters."""
    return _dense(_small())


PRESETS = {"tiny": _tiny, "small": _small, "v3-15m": _v3_15m, "v3-60m": _v3_60m, "v3-250m": _v3_250m,
           "v2-lite": _v2_lite, "v3-671b": _v3_671b,
           "dense-tiny": _dense_tiny, "dense-small": _dense_small, "dense-base": _dense_base}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named configuration; keyword overrides replace fields (e.g. vocab_size of a tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]().replace(**overrides)


SET_HELP = ("replace a field of the preset, FIELD=VALUE with a config.json field name and a JSON value "
            "(--set num_hidden_layers=8 --set q_lora_rank=null); repeatable, checked as any config")


def parse_overrides(items: list[str], flag: str = "--set") -> dict[str, Any]:
    """``["num_hidden_layers=8", ...]`` → ``{"num_hidden_layers": 8}``: names are ModelConfig's
    fields, values JSON (a bare word is a string). One line naming the item when it is wrong."""
    import difflib

    names = [f.name for f in dataclasses.fields(ModelConfig)]
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{flag} {item}: expected FIELD=VALUE, e.g. {flag} num_hidden_layers=8")
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ValueError(f"{flag} {item}: no model config field {name!r}{hint}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def preset_with(name: str, items: list[str], flag: str = "--set", **fixed: Any) -> ModelConfig:
    """Preset ``name`` with the command line's ``--set`` items (then ``fixed``: what the command
    itself decides, e.g. the tokenizer's vocabulary), validated as every config is."""
    changes = parse_overrides(items, flag)
    base = preset(name)
    if ("num_hidden_layers" in changes and "first_k_dense_replace" not in changes
            and base.first_k_dense_replace >= base.num_hidden_layers):
        changes["first_k_dense_replace"] = changes["num_hidden_layers"]  # a dense preset stays dense
    heads = changes.get("num_attention_heads")
    if heads is not None:  # MLA: every head has its own K and V, expanded from the latent
        changes.setdefault("num_key_value_heads", heads)
    try:
        cfg = preset(name, **changes, **fixed)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{flag} {' '.join(items)}: {e}") from None
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        raise ValueError(f"{flag} {' '.join(items)}: num_key_value_heads={cfg.num_key_value_heads} must equal "
                         f"num_attention_heads={cfg.num_attention_heads} (MLA expands K and V per head)")
    return cfg
