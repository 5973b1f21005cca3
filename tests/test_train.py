"""The training loop: schedule, optimizer groups, batches, bits per byte, checkpoints, exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from nanoseek.train.data import BatchLoader, TokenStream
from nanoseek.train.loop import TrainConfig, lr_at, param_groups
from nanoseek.train.pretrain import PretrainConfig, pretrain

DATA = "builtin:arith?n=150"


def tiny_cfg(out, **kw) -> PretrainConfig:
    base = dict(preset="tiny", data=DATA, out=str(out), max_steps=6, batch_size=4, seq_len=32, learning_rate=3e-3,
                warmup_steps=2, logging_steps=1, eval_steps=0, save_steps=0, val_tokens=128, arith_eval=0,
                progress=False)
    base.update(kw)
    return PretrainConfig(**base)


def losses(run) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


# ---------------------------------------------------------------------- schedule and optimizer
def test_lr_schedules():
    c = TrainConfig(max_steps=100, learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(55, c) == pytest.approx(0.55)  # cosine half-way: (1 + 0.1) / 2
    assert lr_at(100, c) == pytest.approx(0.1)
    w = TrainConfig(max_steps=100, learning_rate=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(79, w) == 1.0 and lr_at(90, w) == pytest.approx(0.5) and lr_at(100, w) == 0.0


def test_weight_decay_on_matrices_only():
    from nanoseek import preset
    from nanoseek.model import DeepSeekV3

    m = DeepSeekV3(preset("tiny"))
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    dec = {names[id(p)] for p in decay["params"]}
    nod = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed_tokens.weight" in nod and "norm.weight" in nod and "layers.0.input_layernorm.weight" in nod
    assert "lm_head.weight" in dec and "layers.1.mlp.experts.gate_proj" in dec and "layers.0.self_attn.kv_b_proj.weight" in dec
    assert len(dec) + len(nod) == len(names)


# ---------------------------------------------------------------------- batches
def test_rank_slices_make_the_global_batch_and_position_resumes():
    stream = TokenStream(np.arange(1000))
    one = BatchLoader(stream, global_batch=4, seq_len=8)
    x, y = one.next()
    assert x.shape == (4, 8) and torch.equal(y, x + 1) and x[1, 0] == 8
    r0, r1 = (BatchLoader(stream, 4, 8, rank=r, world_size=2) for r in (0, 1))
    assert torch.equal(torch.cat([r0.next()[0], r1.next()[0]]), x)
    state = one.state_dict()
    nxt = one.next()[0]
    again = BatchLoader(stream, 4, 8)
    again.load_state_dict(state)
    assert torch.equal(again.next()[0], nxt) and nxt[0, 0] == 32
    # the stream wraps into a new epoch
    small = BatchLoader(TokenStream(np.arange(20)), 2, 8)
    small.next()
    x2, _ = small.next()
    assert small.epoch == 1 and x2[0].tolist() == [16, 17, 18, 19, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="not divisible"):
        BatchLoader(stream, 5, 8, world_size=2)


# ---------------------------------------------------------------------- bits per byte
def test_bits_per_byte_of_a_uniform_model():
    from nanoseek.eval.loss import evaluate_loss

    V = 16

    class Uniform(nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, V)

    nbytes = torch.tensor([0] * 8 + [1, 2, 1, 3, 1, 1, 2, 1])  # ids < 8 are special: no bytes
    y = torch.tensor([[1, 8, 9, 11], [8, 0, 15, 12]])
    r = evaluate_loss(Uniform(), [(y, y)], token_nbytes=nbytes)
    assert r["val_loss"] == pytest.approx(math.log(V))
    n_text, n_bytes = 6, 1 + 2 + 3 + 1 + 1 + 1  # specials (1, 0) left out
    assert r["val_bpb"] == pytest.approx(n_text * math.log(V) / (math.log(2) * n_bytes))


# ---------------------------------------------------------------------- a run end to end
def test_pretrain_writes_loadable_checkpoints_and_resumes_exactly(tmp_path):
    """6 uninterrupted steps vs 3 steps, Ctrl-C, --resume for 3 more: identical losses."""
    full = tmp_path / "full"
    pretrain(tiny_cfg(full, save_steps=2, keep_last=2))
    ref = losses(full)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and ref[6] < ref[1]
    # checkpoints: the last K periodic ones, and a complete RUN/model directory
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    final = full / "model"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "trainer_state.pt"):
        assert (final / f).exists(), f
    assert json.loads((full / "config.json").read_text())["preset"] == "tiny"
    assert (full / "report.md").exists() and (full / "loss.png").stat().st_size > 1000

    import nanoseek

    model = nanoseek.load_model(final)
    state = torch.load(final / "trainer_state.pt", weights_only=False)
    assert state["step"] == 6 and state["loader"]["position"] == 6 * 4 * 32
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-4)

    split = tmp_path / "split"

    def interrupt(trainer, metrics):
        if trainer.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_cfg(split), on_step=interrupt)
    assert (split / "checkpoints" / "step_000003" / "trainer_state.pt").exists()
    assert not (split / "model").exists()
    pretrain(tiny_cfg(split, resume=True))
    got = losses(split)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for s in ref:
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])


def test_router_bias_moves_against_load(tmp_path):
    """γ > 0 changes the router bias by exactly ±γ per step and per expert; γ = 0 leaves it at 0."""
    for gamma in (0.0, 0.01):
        run = tmp_path / f"g{gamma}"
        pretrain(tiny_cfg(run, max_steps=2, router_gamma=gamma, val_tokens=32))
        from nanoseek.checkpoint import load_pretrained

        m = load_pretrained(run / "model")
        bias = torch.cat([moe.gate.e_score_correction_bias for moe in m.moe_layers()])
        steps_abs = (bias.abs() / 0.01).round()
        if gamma:
            assert bias.abs().max() > 0 and torch.allclose(bias.abs(), steps_abs * 0.01, atol=1e-6)
            assert steps_abs.max() <= 2
        else:
            assert bias.abs().max() == 0
