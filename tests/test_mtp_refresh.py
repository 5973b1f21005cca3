"""Keeping the MTP module a good draft after post-training: `--mtp-weight` in SFT and GRPO, and
`nanoseek mtp-refresh`, which re-fits it to the final model's own outputs, main model frozen."""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek.checkpoint import load_pretrained
from nanoseek.train.grpo import GRPOConfig, Rollout, grpo_update
from nanoseek.train.loop import Trainer
from nanoseek.train.mtp_refresh import MTPRefreshConfig, mtp_refresh
from nanoseek.train.sft import SFTConfig, sft


pytestmark = pytest.mark.usefixtures("one_thread")


def split(model) -> tuple[dict, dict]:
    """(main model tensors, MTP module tensors), copied."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return ({k: v for k, v in sd.items() if not k.startswith("mtp.")},
            {k: v for k, v in sd.items() if k.startswith("mtp.")})


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mtp_refresh_raises_acceptance_and_leaves_the_main_model(ckpt, tmp_path):
    run = tmp_path / "mtp"
    cfg = MTPRefreshConfig(ckpt=str(ckpt), out=str(run), task_args={"digits": 2}, num_prompts=48, eval_prompts=12,
                           max_new_tokens=24, max_steps=40, batch_size=8, seq_len=128, learning_rate=1e-2,
                           speculative_tokens=2, progress=False)
    out = mtp_refresh(cfg)
    before, after = load_pretrained(ckpt), load_pretrained(out)
    main0, mtp0 = split(before)
    main1, mtp1 = split(after)
    assert same(main0, main1) and not same(mtp0, mtp1)  # only the MTP module moved
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_acceptance_pos1" in r]
    assert [r["step"] for r in evals] == [0, 40]
    first, last = evals
    assert last["eval_acceptance_pos1"] > first["eval_acceptance_pos1"] + 0.3, evals
    assert last["eval_mean_accepted_length"] > first["eval_mean_accepted_length"]
    assert {"eval_acceptance_pos2", "eval_acceptance"} <= last.keys()
    losses = [r["mtp_loss"] for r in log if "mtp_loss" in r]
    assert losses[-1] < 0.85 * losses[0]
    assert "acceptance" in (run / "report.md").read_text()


def test_mtp_refresh_refuses_bad_flags(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"--speculative-tokens 0: must be ≥ 1"):
        MTPRefreshConfig(ckpt=str(ckpt), out=str(tmp_path / "x"), speculative_tokens=0)
    with pytest.raises(FileNotFoundError, match=r"--data nope.jsonl"):
        MTPRefreshConfig(ckpt=str(ckpt), out=str(tmp_path / "x"), data="nope.jsonl")
    with pytest.raises(ValueError, match=r"--task-args"):
        MTPRefreshConfig(ckpt=str(ckpt), out=str(tmp_path / "x"), task_args={"digitz": 2})


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_sft_mtp_weight_trains_the_mtp_module(ckpt, tmp_path, weight):
    run = tmp_path / f"sft{weight}"
    out = sft(SFTConfig(ckpt=str(ckpt), data="builtin:sft-arith?n=24&seed=0", out=str(run), max_steps=3,
                        batch_size=4, seq_len=128, learning_rate=3e-3, warmup_steps=1, logging_steps=1,
                        progress=False, mtp_weight=weight))
    _, mtp0 = split(load_pretrained(ckpt))
    _, mtp1 = split(load_pretrained(out))
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if weight:
        assert not same(mtp0, mtp1)
        r = log[0]  # the reported total is the assistant-token loss + λ·L_MTP
        assert r["loss"] == pytest.approx(r["sft_loss"] + weight * r["mtp_loss"], rel=1e-5)
    else:
        assert same(mtp0, mtp1) and "mtp_loss" not in log[0]


def test_grpo_mtp_weight_trains_the_mtp_module_and_leaves_the_policy_update(ckpt):
    """The MTP loss reads the policy's hidden states detached: with clipping off, the policy's
    weights after a step are exactly those of a step without it; only the MTP module differs."""
    g = torch.Generator().manual_seed(0)
    rolls = []
    for i in range(8):
        p = torch.randint(8, 264, (6,), generator=g).tolist() if i % 4 == 0 else rolls[-1].prompt_ids
        rolls.append(Rollout(p, torch.randint(8, 264, (5,), generator=g).tolist(), False))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 2.0])
    result = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = load_pretrained(ckpt).train()
        cfg = GRPOConfig(ckpt="-", task="arithmetic", out="-", num_generations=4, prompts_per_step=2,
                         max_grad_norm=0, dtype="float32", learning_rate=1e-2, mtp_weight=weight)
        st = grpo_update(Trainer(cfg, model), None, rolls, rewards, cfg, pad_id=2)
        result[weight] = (split(model), st)
    (main0, mtp0), _ = result[0.0]
    (main1, mtp1), st = result[1.0]
    assert same(main0, main1) and not same(mtp0, mtp1)
    assert st["mtp_loss"] > 0 and "mtp_loss" not in result[0.0][1]
