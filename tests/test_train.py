"""The training loop: schedule, optimizer groups, batches, bits per byte, checkpoints, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

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


# ---------------------------------------------------------------------- the run directory and the CLI
def tree(run) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_cli_refuses_a_fresh_run_into_a_run_and_resumes_from_config_alone(tmp_path, capsys):
    """A fresh run into an existing RUN exits non-zero touching nothing; `--out RUN --resume` with
    no other flag continues from RUN/config.json exactly; a schedule change on resume is refused."""
    from nanoseek.cli import main

    full, split = tmp_path / "full", tmp_path / "split"
    pretrain(tiny_cfg(full))
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_cfg(split), on_step=lambda tr, m: tr.step == 3 and (_ for _ in ()).throw(KeyboardInterrupt))
    before = tree(split)
    assert main(["pretrain", "--preset", "tiny", "--out", str(split)]) == 2
    assert "--resume" in capsys.readouterr().err and tree(split) == before
    assert main(["pretrain", "--out", str(split), "--resume", "--max-steps", "9"]) == 2
    assert "schedule" in capsys.readouterr().err and tree(split) == before
    assert main(["pretrain", "--out", str(split), "--resume"]) == 0
    got, ref = losses(split), losses(full)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert all(abs(got[s] - ref[s]) <= 1e-6 for s in ref)
    # --overwrite replaces the run
    assert main(["pretrain", "--out", str(split), "--overwrite", "--max-steps", "1", "--warmup-steps", "0", "--preset", "tiny",
                 "--data", DATA, "--seq-len", "32", "--batch-size", "4", "--arith-eval", "0", "--progress", "false",
                 "--val-tokens", "64"]) == 0
    assert sorted(losses(split)) == [1] and not (split / "checkpoints").exists()


@pytest.mark.parametrize("argv, flag", [(["--max-steps", "-5"], "--max-steps"), (["--batch-size", "0"], "--batch-size"),
                                        (["--seq-len", "257"], "--seq-len"), (["--learning-rate", "0"], "--learning-rate")])
def test_bad_shared_knobs_are_one_line_naming_the_flag(tmp_path, capsys, argv, flag):
    from nanoseek.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--out", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and not run.exists()
    PretrainConfig(preset="tiny")  # the default seq-len fits the tiny preset's context


SHARED = ["--learning-rate", "--max-steps", "--warmup-steps", "--max-grad-norm", "--weight-decay",
          "--gradient-accumulation-steps", "--seed", "--dtype", "--resume", "--max-minutes", "--out",
          "--router-gamma", "--balance-alpha", "--save-steps", "--eval-steps", "--logging-steps", "--overwrite"]


@pytest.mark.parametrize("cmd", ["pretrain", "sft", "grpo"])
def test_help_lists_the_shared_knobs_each_with_a_help_line(cmd, capsys):
    from nanoseek.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[cmd]
    text = sub.format_help()  # a stray % in a help string would raise here
    helps = {a.option_strings[0]: a.help for a in sub._actions if a.option_strings and a.dest != "help"}
    for flag in SHARED:
        assert flag in helps and flag in text, (cmd, flag)
    for flag, h in helps.items():
        assert h and not h.startswith(" (default"), (cmd, flag)


def test_stale_checkpoint_writes_are_removed_and_the_checkpoints_kept(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_cfg(run), on_step=lambda tr, m: tr.step == 2 and (_ for _ in ()).throw(KeyboardInterrupt))
    stale = run / "checkpoints" / ".step_000004.tmp-abc"  # what a kill during a write leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    pretrain(tiny_cfg(run, resume=True))
    assert not stale.exists() and (run / "model" / "trainer_state.pt").is_file()


def test_engine_greedy_equals_the_plain_forward_on_a_trained_model(tmp_path):
    """eval/arith decodes with the engine: its accuracy is the one the model's plain-forward
    greedy decode (the reference) gives, token for token."""
    from nanoseek.checkpoint import load_pretrained
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.eval.arith import addition_accuracy
    from nanoseek.tasks import ArithmeticTask, parse_pretrain_answer, pretrain_prompt
    from nanoseek.tokenizer import Tokenizer

    run = tmp_path / "run"
    pretrain(tiny_cfg(run, max_steps=8))
    model, tok = load_pretrained(run / "model"), Tokenizer.load(run / "model")
    problems = ArithmeticTask(digits=3, ops="+", chain=2).make(8, 0, split="test")
    prompts = [[tok.eos_id] + tok.encode(pretrain_prompt(p), allow_special=False) for p in problems]
    ref = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), 24, eos_token_id=tok.eos_id)[0, len(ids):].tolist()
        ref.append(out[:out.index(tok.eos_id) + 1] if tok.eos_id in out else out)
    got = [o.token_ids for o in Engine(model, tok).generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))]
    assert [g[:len(r)] for g, r in zip(got, ref)] == ref
    acc = sum(parse_pretrain_answer(tok.decode(r)) == p.answer for r, p in zip(ref, problems)) / len(problems)
    assert addition_accuracy(model, tok, n=8, max_new_tokens=24)["accuracy"] == acc


def _stage_argv(stage: str, out, ckpt) -> list[str]:
    if stage == "pretrain":
        return ["pretrain", "--preset", "tiny", "--data", DATA, "--out", str(out), "--max-steps", "40",
                "--batch-size", "4", "--seq-len", "32", "--arith-eval", "0", "--val-tokens", "64", "--eval-steps", "0",
                "--save-steps", "0", "--logging-steps", "1", "--progress", "false"]
    if stage == "sft":
        return ["sft", "--ckpt", str(ckpt), "--data", "builtin:sft-arith?n=40", "--out", str(out), "--max-steps", "40",
                "--batch-size", "2", "--seq-len", "128", "--logging-steps", "1", "--progress", "false"]
    return ["grpo", "--ckpt", str(ckpt), "--task", "arithmetic", "--task-args", '{"digits": 2}', "--out", str(out),
            "--max-steps", "12", "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "4",
            "--eval-steps", "0", "--eval-problems", "2", "--save-steps", "0", "--reward-funcs", "test_grpo:length_reward",
            "--mask-truncated-completions", "false", "--learning-rate", "1e-3", "--dtype", "float32"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "grpo"])
def test_sigterm_saves_and_resume_continues_exactly(stage, ckpt, tmp_path):
    """A subprocess sent SIGTERM mid-run finishes its step, saves a checkpoint and exits; `--resume`
    then continues it to the same losses (rewards, for GRPO) as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import warnings

    from nanoseek.cli import main

    key = "reward" if stage == "grpo" else "loss"

    def metric(run):
        return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r}

    whole, split = tmp_path / "whole", tmp_path / "split"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                                   os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", *_stage_argv(stage, split, ckpt)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (split / "metrics.jsonl").is_file() and len(metric(split)) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    saved = list((split / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.pt").is_file() and not (split / "model").exists(), out[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["grpo" if stage == "grpo" else stage, "--out", str(split), "--resume"]) == 0
        assert main(_stage_argv(stage, whole, ckpt)) == 0
    a, b = metric(whole), metric(split)
    assert sorted(a) == sorted(b) and len(a) > 2 and all(abs(a[s] - b[s]) <= 1e-6 for s in a), (a, b)
