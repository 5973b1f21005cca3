"""config.json carries every field DeepSeek's released V3 config.json carries, so every consumer
(transformers, DeepSeek's own modeling code, llama.cpp's converter) reads the same model."""

from __future__ import annotations

import json

import pytest

from nanoseek.checkpoint import save_pretrained
from nanoseek.config import ModelConfig, preset
from nanoseek.model import DeepSeekV3

# the keys of deepseek-ai/DeepSeek-V3's config.json
DEEPSEEK_V3_KEYS = {
    "architectures", "attention_bias", "attention_dropout", "auto_map", "aux_loss_alpha", "bos_token_id",
    "eos_token_id", "ep_size", "first_k_dense_replace", "hidden_act", "hidden_size", "initializer_range",
    "intermediate_size", "kv_lora_rank", "max_position_embeddings", "model_type", "moe_intermediate_size",
    "moe_layer_freq", "n_group", "n_routed_experts", "n_shared_experts", "norm_topk_prob",
    "num_attention_heads", "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads",
    "num_nextn_predict_layers", "pretraining_tp", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "quantization_config", "rms_norm_eps", "rope_scaling", "rope_theta", "routed_scaling_factor",
    "scoring_func", "seq_aux", "tie_word_embeddings", "topk_group", "topk_method", "torch_dtype",
    "transformers_version", "use_cache", "v_head_dim", "vocab_size",
}
# what an unquantized nanoseek checkpoint rightly leaves out: auto_map names remote-code files the
# directory does not ship, quantization_config describes FP8 weights, transformers_version the
# transformers that wrote the file
NOT_OURS = {"auto_map", "quantization_config", "transformers_version"}


def test_config_json_has_every_deepseek_v3_key(tmp_path):
    save_pretrained(DeepSeekV3(preset("tiny")), tmp_path / "ckpt")
    d = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert sorted(DEEPSEEK_V3_KEYS - NOT_OURS - d.keys()) == []
    assert {k: d[k] for k in ("scoring_func", "topk_method", "moe_layer_freq", "ep_size", "n_group", "topk_group")} \
        == {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "ep_size": 1,
            "n_group": 2, "topk_group": 1}
    # and the file reads back to the same config
    assert ModelConfig.load(tmp_path / "ckpt" / "config.json") == preset("tiny")


def test_a_config_with_moe_every_other_layer_is_refused(tmp_path):
    d = {**preset("tiny").to_hf_dict(), "moe_layer_freq": 2}
    with pytest.raises(ValueError, match="moe_layer_freq=2"):
        ModelConfig.from_hf_dict(d)
