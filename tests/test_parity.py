"""nanoseek must *be* DeepSeek-V3: same weights → same logits and tokens as transformers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import nanoseek
from nanoseek.checkpoint import save_pretrained
from nanoseek.config import ModelConfig, preset
from nanoseek.model import DeepSeekV3

transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

CONFIGS = {
    # q low-rank + n_group > 1 with topk_group < n_group + MTP
    "q_lora_groups_mtp": preset("tiny"),
    # plain q_proj, YaRN, two MTP depths, several groups, no normalisation
    "no_q_lora_yarn": preset("tiny", q_lora_rank=None, rope_scaling=YARN, num_nextn_predict_layers=2,
                             n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=3,
                             norm_topk_prob=False, routed_scaling_factor=1.7, max_position_embeddings=256),
    # YaRN with mscale ≠ mscale_all_dim (cos/sin amplitude), 2 shared experts, no dense layer
    "yarn_mscale_shared2": preset("tiny", rope_scaling={**YARN, "factor": 8.0, "mscale": 0.9,
                                                        "mscale_all_dim": 0.707},
                                  n_shared_experts=2, first_k_dense_replace=0, num_hidden_layers=2),
    # one routed expert per token: its normalised gate is 1 (the sigmoid score alone is not)
    "one_expert_per_token": preset("tiny", num_experts_per_tok=1, n_group=1, topk_group=1),
}


def randomise(model: DeepSeekV3, seed: int) -> None:
    """Random norm weights and router bias, so parity cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        for m in model.moe_layers():
            if hasattr(m.gate, "e_score_correction_bias"):
                m.gate.e_score_correction_bias.copy_(0.05 * torch.randn(m.gate.e_score_correction_bias.shape,
                                                                        generator=g))
            m.gate.weight.mul_(20)  # sharper routing: more distinct choices to get right


def hf_class(cfg: ModelConfig):
    return transformers.DeepseekV2ForCausalLM if cfg.is_v2 else transformers.DeepseekV3ForCausalLM


def load_hf(path, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_class(cfg).from_pretrained(path, dtype=torch.float32).eval()


def check_same(ours: DeepSeekV3, theirs, vocab: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 40), generator=g)
    with torch.no_grad():
        a = ours(ids)
        b = theirs(ids).logits
    assert a.shape == b.shape == (3, 40, vocab)
    assert (a - b).abs().max().item() <= 1e-4
    prompt = ids[:, :8]
    with torch.no_grad():
        ga = ours.generate(prompt, 32)
        gb = theirs.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                             pad_token_id=0, eos_token_id=None)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nanoseek_to_transformers(name, tmp_path):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ours = DeepSeekV3(cfg).eval()
    randomise(ours, 1)
    save_pretrained(ours, tmp_path / "ckpt")
    theirs = load_hf(tmp_path / "ckpt", cfg)
    check_same(ours, theirs, cfg.vocab_size, 2)
    # and back: our own load of our own file is exact
    again = nanoseek.load_model(tmp_path / "ckpt")
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.equal(again(ids), ours(ids))
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_to_nanoseek(name, tmp_path):
    cfg = CONFIGS[name]
    torch.manual_seed(3)
    ours = DeepSeekV3(cfg).eval()
    randomise(ours, 4)
    save_pretrained(ours, tmp_path / "a")
    theirs = load_hf(tmp_path / "a", cfg)
    theirs.save_pretrained(tmp_path / "b")  # transformers' own writing (drops MTP)
    with pytest.warns(UserWarning, match="multi-token-prediction"):
        back = nanoseek.load_model(tmp_path / "b")
    check_same(back, theirs, cfg.vocab_size, 5)


def test_deepseek_v2_routing_matches_transformers(tmp_path):
    cfg = preset("tiny", model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
                 q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                 routed_scaling_factor=1.0, num_nextn_predict_layers=0, n_shared_experts=2)
    torch.manual_seed(6)
    ours = DeepSeekV3(cfg).eval()
    randomise(ours, 7)
    save_pretrained(ours, tmp_path / "v2")
    import json

    assert json.loads((tmp_path / "v2" / "config.json").read_text())["model_type"] == "deepseek_v2"
    theirs = load_hf(tmp_path / "v2", cfg)
    assert type(theirs).__name__ == "DeepseekV2ForCausalLM"
    check_same(ours, theirs, cfg.vocab_size, 8)


def test_v2_group_limited_greedy_matches_transformers(tmp_path):
    cfg = preset("tiny", model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
                 q_lora_rank=None, n_group=4, topk_group=2, norm_topk_prob=False,
                 routed_scaling_factor=1.3, num_nextn_predict_layers=0, rope_scaling=YARN)
    torch.manual_seed(9)
    ours = DeepSeekV3(cfg).eval()
    randomise(ours, 10)
    save_pretrained(ours, tmp_path / "v2g")
    check_same(ours, load_hf(tmp_path / "v2g", cfg), cfg.vocab_size, 11)


def test_v3_config_json_carries_deepseeks_routing_fields(tmp_path):
    """DeepSeek's released V3 config.json names its gating; converters (llama.cpp's) read it from
    there and silently fall back to softmax without it."""
    save_pretrained(DeepSeekV3(preset("tiny")), tmp_path / "ckpt")
    d = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert d["model_type"] == "deepseek_v3"
    assert {k: d[k] for k in ("scoring_func", "topk_method", "norm_topk_prob")} == {
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True}
    for k in ("n_group", "topk_group", "num_nextn_predict_layers", "routed_scaling_factor",
              "first_k_dense_replace", "n_shared_experts", "n_routed_experts", "kv_lora_rank"):
        assert k in d, k
    with pytest.raises(ValueError, match="deepseek_v3 routes with"):
        ModelConfig.from_hf_dict({**d, "scoring_func": "softmax"})
