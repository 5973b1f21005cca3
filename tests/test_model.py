"""The model's own invariants: router rules, absorbed == expanded MLA, MTP, counting, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import save_pretrained
from nanoseek.config import ModelConfig, preset
from nanoseek.counting import count, info, InfoConfig
from nanoseek.model import DeepSeekV3, DenseLatentCache
from nanoseek.model.moe import Router

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


# ---------------------------------------------------------------------- router
def router(cfg: ModelConfig, seed=0) -> Router:
    torch.manual_seed(seed)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=1.0)
    return r


def test_bias_changes_choice_not_weights():
    cfg = preset("tiny", n_group=1, topk_group=1)
    r = router(cfg)
    x = torch.randn(64, cfg.hidden_size)
    w0, idx0, s = r(x)
    # push expert 0 into every top-k with a large bias
    r.e_score_correction_bias[0] = 10.0
    w1, idx1, s1 = r(x)
    assert torch.equal(s, s1)  # scores themselves are unbiased
    assert (idx1 == 0).any(-1).all()  # the bias changed the choice ...
    assert not torch.equal(idx0.sort(-1).values, idx1.sort(-1).values)
    # ... but each chosen expert's weight is its unbiased score, renormalised and scaled
    raw = s.gather(1, idx1)
    expect = raw / raw.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(w1, expect, atol=1e-6)


def test_masked_groups_are_never_chosen():
    cfg = preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    r = router(cfg, seed=1)
    x = torch.randn(256, cfg.hidden_size)
    w, idx, s = r(x)
    biased = (s + r.e_score_correction_bias).view(-1, 4, 4)
    group_score = biased.topk(2, dim=-1).values.sum(-1)
    kept = group_score.topk(2, dim=-1).indices  # (N, 2) allowed groups
    chosen_groups = idx // 4
    assert (chosen_groups[..., None] == kept[:, None, :]).any(-1).all()
    # and the choice within the kept groups is the true top-k there
    masked = torch.full_like(s, float("-inf"))
    for g in range(2):
        cols = (kept[:, g:g + 1] * 4 + torch.arange(4)).long()
        masked.scatter_(1, cols, biased.flatten(1).gather(1, cols))
    assert torch.equal(idx.sort(-1).values, masked.topk(4, dim=-1).indices.sort(-1).values)


def test_weights_sum_to_scaling_factor_when_normalised():
    cfg = preset("tiny", routed_scaling_factor=2.5, norm_topk_prob=True)
    w, _, _ = router(cfg)(torch.randn(32, cfg.hidden_size))
    assert torch.allclose(w.sum(-1), torch.full((32,), 2.5), atol=1e-5)
    cfg = cfg.replace(norm_topk_prob=False)
    w, idx, s = router(cfg)(torch.randn(32, cfg.hidden_size))
    assert torch.allclose(w, s.gather(1, idx) * 2.5)  # without normalisation: raw scores, scaled
    assert not torch.allclose(w.sum(-1), torch.full((32,), 2.5))


def test_bias_update_moves_against_load():
    model = DeepSeekV3(preset("tiny")).train()
    x = torch.randint(0, 512, (4, 32))
    model(x, x).loss.backward()
    moe = model.moe_layers()[0]
    load = moe.tokens_per_expert.clone()
    assert load.sum() == 4 * 32 * 2  # every token counted k times
    viol = model.update_router_bias(0.01)
    b = moe.gate.e_score_correction_bias
    assert viol[0] == pytest.approx(float(load.max() / load.mean() - 1))
    assert torch.equal(b, 0.01 * torch.sign(load.mean() - load))
    assert moe.tokens_per_expert.sum() == 0  # counts reset for the next step
    assert b.grad is None and not b.requires_grad


# ---------------------------------------------------------------------- attention paths
@pytest.mark.parametrize("q_lora, rope", [(32, None), (None, YARN)])
def test_absorbed_decode_matches_expanded(q_lora, rope):
    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny", q_lora_rank=q_lora, rope_scaling=rope)).eval()
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full = model(ids)  # expanded, whole sequence
        cache = DenseLatentCache.for_model(model, 2, 40)
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(40)], dim=1)
    assert (full - steps).abs().max().item() <= 1e-4
    assert cache.bytes_per_token == 3 * (32 + 8) * 4  # only c_kv and k_pe, per layer


def test_prefill_then_absorbed_decode():
    torch.manual_seed(1)
    model = DeepSeekV3(preset("tiny")).eval()
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        full = model(ids)
        cache = DenseLatentCache.for_model(model, 1, 24)
        pre = model(ids[:, :16], cache=cache, absorb=False)  # expanded prefill into the cache
        rest = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(16, 24)], 1)
    assert (torch.cat([pre, rest], 1) - full).abs().max() <= 1e-4


@pytest.mark.parametrize("T", [1, 37, 64, 130])
def test_blocked_causal_attention_matches_sdpa(T):
    """The block-skipping causal attention (forward and its hand-written backward) == SDPA's:
    square, and with the T queries at the end of S = T + 9 keys, some of them hidden per row by
    a key bias (GRPO's shared-prompt update: a prompt's padding)."""
    from nanoseek.model.attention import CausalAttention

    g = torch.Generator().manual_seed(T)
    for S, hide in ((T, None), (T + 9, [2, 0])):  # row 0 hides its last 2 prompt keys, row 1 none
        q = torch.randn(2, 3, T, 24, generator=g, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, 3, S, 24, generator=g, dtype=torch.float64, requires_grad=True)
        v = torch.randn(2, 3, S, 16, generator=g, dtype=torch.float64, requires_grad=True)
        d_out = torch.randn(2, 3, T, 16, generator=g, dtype=torch.float64)
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T).expand(2, 1, T, S).clone()
        bias = None
        if hide:
            bias = torch.zeros(2, S, dtype=torch.float64)
            for b, n in enumerate(hide):
                bias[b, S - T - n:S - T] = float("-inf")
                mask[b, :, :, S - T - n:S - T] = False
        ours = CausalAttention.apply(q, k, v, 0.3, bias, 32)
        grads = torch.autograd.grad(ours, (q, k, v), d_out)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), d_out)):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(ours, ref)


def test_yarn_softmax_scale_v3():
    cfg = preset("v3-671b")
    assert cfg.softmax_scale() == pytest.approx(192**-0.5 * (0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)
    assert cfg.softmax_scale() == pytest.approx(0.1352, abs=1e-4)


# ---------------------------------------------------------------------- training forward
def test_training_forward_losses():
    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny")).train()
    ids = torch.randint(0, 512, (2, 16))
    tgt = torch.roll(ids, -1, 1)
    tgt[:, -1] = -100
    out = model(ids, tgt, mtp_weight=0.3, balance_alpha=1e-4)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 0.3 * out.mtp_loss.item()
                                            + 1e-4 * out.balance_loss.item(), rel=1e-6)
    # untrained: both heads near uniform over 512 tokens
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.1
    assert abs(out.mtp_loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.1
    # perfectly balanced routing gives L_Bal = 1 (Σ f_i P_i with f ≡ 1, Σ P = 1); random is near it
    assert 0.9 < out.balance_loss.item() < 1.5
    out.loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    # λ = 0 skips the MTP modules (their MoE takes no part in the balance loss)
    out = model(ids, tgt, mtp_weight=0.0, balance_alpha=1e-4)
    assert out.mtp_loss is None and out.loss.item() == pytest.approx(
        out.lm_loss.item() + 1e-4 * out.balance_loss.item(), rel=1e-6)


# ---------------------------------------------------------------------- counting
def test_counts_v3_671b():
    c = count(preset("v3-671b"))
    assert abs(c.total / 671e9 - 1) < 0.01
    assert abs(c.activated / 37e9 - 1) < 0.011
    assert c.mla_cache_bytes == 70_272
    assert c.mha_cache_bytes == 61 * 128 * (192 + 128) * 2


def test_counts_match_real_parameters():
    cfg = preset("tiny")
    c = count(cfg)
    model = DeepSeekV3(cfg)
    assert c.total == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert c.total < 1_000_000


def test_info_cli(capsys):
    from nanoseek.cli import main

    assert main(["info", "--preset", "v3-671b"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "70,272 bytes" in out and "4,997,120 bytes" in out
    assert main(["info", "--preset", "nope"]) == 2
    assert "--preset 'nope': unknown preset; choose one of tiny" in capsys.readouterr().err


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_names_and_dtypes(tmp_path):
    model = DeepSeekV3(preset("tiny"))
    save_pretrained(model, tmp_path / "c")
    sd = load_file(str(tmp_path / "c" / "model.safetensors"))
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in sd
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "model.layers.3.eh_proj.weight" in sd and sd["model.layers.3.eh_proj.weight"].shape == (64, 128)
    assert "model.layers.3.shared_head.head.weight" in sd and "model.layers.3.mlp.experts.0.up_proj.weight" in sd
    assert "model.layers.0.mlp.gate_proj.weight" in sd  # first_k_dense_replace = 1


def test_corrupt_and_mismatched_files_name_file_and_key(tmp_path):
    model = DeepSeekV3(preset("tiny"))
    d = save_pretrained(model, tmp_path / "c")
    f = d / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(f))
    with pytest.raises(ValueError, match=r"model\.safetensors.*kv_b_proj.*shape"):
        nanoseek.load_model(d)
    del sd["model.layers.0.self_attn.kv_b_proj.weight"]
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="missing weights.*kv_b_proj"):
        nanoseek.load_model(d)
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read"):
        nanoseek.load_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        nanoseek.load_model(d)


def test_atomic_save_keeps_old_checkpoint_on_failure(tmp_path):
    model = DeepSeekV3(preset("tiny"))
    d = save_pretrained(model, tmp_path / "c")
    before = (d / "model.safetensors").read_bytes()

    def boom(_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_pretrained(DeepSeekV3(preset("tiny")), d, extra={"x": boom})
    assert (d / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary leftovers


def test_load_model_public_api(tmp_path):
    m = nanoseek.load_model("tiny", seed=0)
    ids = torch.randint(0, 512, (2, 5))
    logits = m(ids)
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, 512)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a preset"):
        nanoseek.load_model(tmp_path / "missing")
