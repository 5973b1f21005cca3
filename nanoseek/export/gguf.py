"""`nanoseek export --format gguf`: a checkpoint as one GGUF file that llama.cpp's `deepseek2`
architecture runs as it is, written with the `gguf` package (llama.cpp's own writer).

What llama.cpp must be told, and nanoseek says so explicitly rather than leaving it to defaults:

* the gating function (`expert_gating_func`): deepseek2 falls back to softmax without it, which
  silently routes a V3 model wrong;
* the router bias b_i as `exp_probs_b` (selection only, V3 eq. 16), expert groups and the
  top-k normalisation and scale;
* MLA in its absorbed form: llama.cpp caches the latent and runs attention as MQA over it, so
  kv_b is split into W_UK per head, transposed (`attn_k_b`: q_nope·W_UK folds into latent
  space), and W_UV (`attn_v_b`), exactly as llama.cpp's converter writes them;
* the pre-tokenizer: a BPE vocabulary runs only with a pre-type llama.cpp knows. nanoseek splits
  digits one by one, then applies the GPT-2 regex (nanoseek/tokenizer.py): that is llama.cpp's
  `starcoder` pre-type, regex for regex.

The MTP modules are not exported (llama.cpp's deepseek2 does not run them; its converter drops
them too). Routed experts are stacked per layer, as llama.cpp stores them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from ..checkpoint import RUN_MODEL, ckpt_flag, load_pretrained
from ..config import ModelConfig
from ..model import DeepSeekV3

ARCH = gguf.MODEL_ARCH.DEEPSEEK2
GATING = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
TYPES = {  # --type → (file type, what a 2-D weight is stored as)
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


@dataclass
class ExportConfig:
    """`nanoseek export`: write a checkpoint in another runtime's format."""

    ckpt: str = field(metadata={"help": "checkpoint directory (config.json, model.safetensors, tokenizer.json), "
                                        "or any stage's run directory (its model/)"})
    out: str = field(metadata={"help": "the file to write (FILE.gguf)"})
    format: str = field(default="gguf", metadata={"help": "gguf: llama.cpp's deepseek2 architecture",
                                                  "choices": ["gguf"]})
    type: str = field(default="f32", metadata={"help": "how weight matrices are stored: f32, or q8_0 "
                                                       "(norms, biases and the router stay f32)",
                                               "choices": list(TYPES)})

    def __post_init__(self) -> None:
        if self.format != "gguf":
            raise ValueError(f"--format {self.format!r}: expected gguf")
        if self.type not in TYPES:
            raise ValueError(f"--type {self.type!r}: expected one of {', '.join(TYPES)}")
        if Path(self.out).is_dir():
            raise ValueError(f"--out {self.out}: is a directory; expected the path of the .gguf file")


def export(cfg: ExportConfig) -> None:
    """Write a checkpoint as a GGUF file llama.cpp runs (deepseek2: MLA, sigmoid routing, bias)."""
    ckpt = ckpt_flag(cfg.ckpt)
    if not (ckpt / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--ckpt {cfg.ckpt}: no tokenizer.json in {ckpt} beside the weights")
    path = write_gguf(load_pretrained(ckpt), ckpt, cfg.out, cfg.type)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB, {cfg.type})")


def write_gguf(model: DeepSeekV3, tokenizer_dir: str | Path, out: str | Path, type: str = "f32") -> Path:
    """`model` (+ the tokenizer files in `tokenizer_dir`) → the GGUF file `out`, written atomically."""
    c = model.config
    check_representable(c)
    ftype, qtype = TYPES[type]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[ARCH])
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(model_name(Path(tokenizer_dir)))
        write_hparams(w, c, ftype)
        write_vocab(w, c, Path(tokenizer_dir))
        for name, data in gguf_tensors(model):
            data, dtype = encode(name, data, qtype)
            w.add_tensor(name, data, raw_dtype=dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def model_name(ckpt: Path) -> str:
    """general.name: the checkpoint directory's name, or its run's for a stage's model/."""
    ckpt = ckpt.resolve()
    return ckpt.parent.name if ckpt.name == RUN_MODEL else ckpt.name


def check_representable(c: ModelConfig) -> None:
    """Refuse, in one line, a model llama.cpp's deepseek2 would run differently from nanoseek."""
    if c.n_routed_experts and c.n_group > 1 and c.topk_method == "group_limited_greedy":
        raise ValueError("topk_method group_limited_greedy with n_group > 1: llama.cpp's deepseek2 scores a group "
                         "by its top-2 sum (noaux_tc), not by its best expert; this model cannot be exported as is")
    y = c.yarn
    if y and y.get("mscale", 1.0) != y.get("mscale_all_dim", 0.0):
        raise ValueError(f"rope_scaling mscale={y.get('mscale')} ≠ mscale_all_dim={y.get('mscale_all_dim')}: "
                         "llama.cpp's deepseek2 assumes them equal (as DeepSeek's releases have them)")
    if c.tie_word_embeddings:
        raise ValueError("tie_word_embeddings: nanoseek's DeepSeek-V3 has an untied lm_head")


def write_hparams(w: gguf.GGUFWriter, c: ModelConfig, ftype: gguf.LlamaFileType) -> None:
    """deepseek2's hyperparameters, as llama.cpp's converter names them for a DeepSeek-V3 config."""
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1)  # MLA as MQA: one latent "head" shared by all query heads
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    moe = c.n_routed_experts > 0
    w.add_leading_dense_block_count(min(c.first_k_dense_replace, c.num_hidden_layers) if moe else c.num_hidden_layers)
    # 0 = plain q_proj: llama.cpp reads the rank for every model outside its "lite" layer counts
    w.add_q_lora_rank(c.q_lora_rank or 0)
    w.add_kv_lora_rank(c.kv_lora_rank)
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)  # absorbed: q·[c_kv; k_pe]
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)  # softmax scale 1/√(this)
    w.add_value_length_mla(c.v_head_dim)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts if moe else 0)
    if moe:
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_group_count(c.n_group)
        w.add_expert_group_used_count(c.topk_group)
        w.add_expert_gating_func(GATING[c.scoring_func])
        w.add_expert_weights_scale(c.routed_scaling_factor)
        if c.norm_topk_prob:
            w.add_expert_weights_norm(True)
    if y := c.yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(y["factor"])
        w.add_rope_scaling_orig_ctx_len(y["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(y.get("beta_fast", 32))
        w.add_rope_scaling_yarn_beta_slow(y.get("beta_slow", 1))
        if (m := y.get("mscale_all_dim")) is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * m)  # llama.cpp divides the 0.1 back out for deepseek2


# ---------------------------------------------------------------------- vocabulary
def pre_tokenizer_type(tok: dict, where: Path) -> str:
    """llama.cpp's name for the tokenizer.json pre-tokenizer: Digits(individual) then byte-level
    GPT-2 regex is `starcoder` (its regexes: "\\p{N}", then GPT-2's)."""
    def byte_level(p) -> bool:
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True) \
            and not p.get("add_prefix_space", False)

    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0] == {"type": "Digits", "individual_digits": True} and byte_level(parts[1]):
        if (tok.get("model") or {}).get("type") == "BPE" and not tok.get("normalizer"):
            return "starcoder"
    raise ValueError(f"{where}: pre-tokenizer {json.dumps(pre)[:120]} is not nanoseek's (digits split, then "
                     "byte-level GPT-2 regex), the one this exporter maps to llama.cpp's `starcoder`")


def write_vocab(w: gguf.GGUFWriter, c: ModelConfig, tokenizer_dir: Path) -> None:
    """Tokens by id (padded to vocab_size as llama.cpp's converter pads), their types, merges,
    special ids and the chat template."""
    file = tokenizer_dir / "tokenizer.json"
    try:
        tok = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    pre = pre_tokenizer_type(tok, file)
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id = {i: t for t, i in tok["model"]["vocab"].items()} | {i: a["content"] for i, a in added.items()}
    if max(by_id) >= c.vocab_size:
        raise ValueError(f"{file}: token id {max(by_id)} does not fit the model's vocab_size={c.vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(c.vocab_size)]
    types = [gguf.TokenType.UNUSED] * c.vocab_size
    for i, t in by_id.items():
        tokens[i] = t
        types[i] = (gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED) \
            if i in added else gguf.TokenType.NORMAL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True).add_to_gguf(w)


# ---------------------------------------------------------------------- tensors
def gguf_tensors(model: DeepSeekV3) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight llama.cpp's deepseek2 reads. Names go through
    the `gguf` package's own map from transformers' names (nanoseek's, under `model.`)."""
    c = model.config
    names = gguf.get_tensor_name_map(ARCH, c.num_hidden_layers)

    def gguf_name(hf: str) -> str:
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"no GGUF name for {hf}")
        return name

    for name, t in model.state_dict().items():
        if name.startswith(("mtp.", "rotary.")):
            continue
        t = t.detach().float()
        hf = name if name == "lm_head.weight" else f"model.{name}"
        if hf.endswith("_proj") and ".mlp.experts." in hf:  # stacked (E, ·, ·), as llama.cpp keeps them
            hf += ".weight"
        hf = hf.replace("e_score_correction_bias", "e_score_correction.bias")  # → exp_probs_b
        if hf.endswith("kv_b_proj.weight"):
            k_b, v_b = split_kv_b(t, c)
            yield gguf_name(hf.replace("kv_b_proj", "k_b_proj")), k_b.numpy()
            yield gguf_name(hf.replace("kv_b_proj", "v_b_proj")), v_b.numpy()
            continue
        yield gguf_name(hf), t.contiguous().numpy()


def split_kv_b(kv_b: torch.Tensor, c: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b (H·(d_nope + d_v), r) → W_UK per head transposed (H, r, d_nope) and W_UV (H, d_v, r):
    per head the K-nope rows come first, then the V rows (MLA's absorbed decode, V2 paper §2.1.3)."""
    per_head = kv_b.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
    k_b, v_b = per_head.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
    return k_b.transpose(1, 2).contiguous(), v_b.contiguous()


def encode(name: str, data: np.ndarray,
           qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor as stored: vectors, norms and the router (ffn_gate_inp) in f32, as llama.cpp keeps
    them; other weights in `qtype`, or f32 where a row is not a whole number of q8_0 blocks."""
    f32 = gguf.GGMLQuantizationType.F32
    if qtype == f32 or data.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return data, f32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return data, f32
