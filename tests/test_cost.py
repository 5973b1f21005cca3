"""The cost model: FLOPs per token counted against what PyTorch runs, DeepSeek-V3's table from
its own token counts, and this CPU's measured throughput."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nanoseek import cli
from nanoseek.config import preset
from nanoseek.cost import GPUS, V3_GPU_HOURS, CostConfig, estimate, training_flops
from nanoseek.counting import count
from nanoseek.model import DeepSeekV3
from nanoseek.train.pretrain import PretrainConfig


def test_flops_per_token_are_the_model_s_own():
    """A forward of T ≤ 64 tokens (one attention block: the full T × T square) does exactly
    2·N per token plus attention's two products; the MTP module adds its matmuls and the shared
    head on T − 1 positions."""
    cfg, T = preset("tiny"), 64
    model = DeepSeekV3(cfg)
    x, y = torch.randint(0, cfg.vocab_size, (2, 1, T))
    c = count(cfg, T)
    per_head = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    with FlopCounterMode(display=False) as fc:
        model(x)
    assert fc.get_total_flops() == 2 * c.matmul_params * T + cfg.num_hidden_layers * per_head * T * T
    assert c.attention_flops_per_token == 3 * cfg.num_hidden_layers * per_head * T / 2  # causal: T/2 keys
    main = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        model(x, y, mtp_weight=0.3)
    mtp_matmul = (c.mtp_flops_per_token - c.attention_flops_per_token / cfg.num_hidden_layers) / 6
    assert fc.get_total_flops() - main == 2 * mtp_matmul * (T - 1) + per_head * (T - 1) ** 2


def test_v3_defaults_reproduce_the_paper_table(capsys):
    assert cli.main(["cost", "--preset", "v3-671b"]) == 0
    out = capsys.readouterr().out
    est = estimate(CostConfig(preset="v3-671b"), quiet=True)
    for stage, hours in V3_GPU_HOURS.items():
        assert est.stages[stage]["hours"] == pytest.approx(hours, rel=0.02), stage
    assert est.hours == pytest.approx(2_788e3, rel=0.02)
    assert est.usd == pytest.approx(5.576e6, rel=0.02)
    assert est.stages["pretraining"]["tokens"] == 14.8e12
    # the MFU it states is what 180K GPU-hours per trillion tokens means for V3's FLOPs on H800
    c = count(preset("v3-671b"), 4096)
    implied = training_flops(c) * 1e12 / (180e3 * 3600 * 989e12)
    assert est.mfu == pytest.approx(implied) and 0.3 < est.mfu < 0.5
    assert f"{implied:.1%} of the bfloat16 peak" in out
    for text in ("2,664.0K", "119.0K", "5.0K", "2,788.0K", "$5.576M", "cache hit", "deepseek-reasoner  0.14 / 0.55 / 2.19"):
        assert text in out, text


def test_first_principles_on_another_accelerator():
    est = estimate(CostConfig(preset="v2-lite", hardware="A100", mfu=0.25, pretrain_tokens=5.7e12, price_per_hour=1.5,
                              tokens_per_s=1000, prefill_tokens_per_s=4000), quiet=True)
    c = count(preset("v2-lite"), 4096)
    hours = 5.7e12 * c.train_flops_per_token / (GPUS["A100"]["bfloat16"] * 0.25) / 3600  # V2-Lite has no MTP
    assert est.stages["pretraining"]["hours"] == pytest.approx(hours)
    assert est.usd == pytest.approx(hours * 1.5)
    assert est.serving["decode"]["usd_per_million"] == pytest.approx(1.5 / 3600 / 1000 * 1e6)
    assert est.serving["prefill"]["source"] == "given"


def test_small_on_this_cpu_uses_its_measured_throughput():
    est = estimate(CostConfig(preset="small", hardware="cpu"), quiet=True)
    p = PretrainConfig()
    assert est.stages["pretraining"]["tokens"] == p.max_steps * p.batch_size * p.seq_len
    assert 0.005 < est.mfu < 1.5  # measured against this machine's matmul probe
    rate = est.mfu * est.peak / est.flops_per_token  # tokens/s of the measured training step
    assert est.stages["pretraining"]["hours"] == pytest.approx(est.stages["pretraining"]["tokens"] / rate / 3600)
    assert est.serving["decode"]["source"].startswith("measured by the engine")
    assert est.serving["decode"]["tokens_per_s"] > 10


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "v3-671b", "--mfu", "2"], "--mfu 2.0: must be in [0, 1]"),
    (["--preset", "small", "--hardware", "A100", "--dtype", "float8"], "--dtype float8: A100's profile has bfloat16"),
    (["--preset", "tiny"], "--pretrain-tokens: --preset tiny has no recipe"),
    (["--preset", "v3-671b", "--pretrain-tokens", "-1"], "--pretrain-tokens -1.0: must be a finite number ≥ 0"),
])
def test_bad_flags_are_one_line(argv, msg, capsys):
    assert cli.main(["cost", *argv]) == 2
    assert msg in capsys.readouterr().err
