"""Two processes under torchrun (gloo on CPU) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from nanoseek.train.pretrain import pretrain

from test_train import DATA, losses, tiny_cfg

STEPS, BATCH = 3, 8
# Summation order differs (DDP averages two ranks' gradients, one process averages two
# micro-batches), so losses agree to float32 rounding, not bit for bit.
TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "nanoseek.cli", "pretrain", "--preset", "tiny", "--data", DATA, "--out", str(out),
           "--max-steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", "32", "--learning-rate", "3e-3",
           "--warmup-steps", "2", "--logging-steps", "1", "--val-tokens", "128", "--arith-eval", "0",
           "--save-steps", "2", "--progress", "false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    # one process: the same 8 sequences per step, as 2 micro-batches of 4 (what each rank holds)
    pretrain(tiny_cfg(out, max_steps=STEPS, batch_size=BATCH, gradient_accumulation_steps=2, save_steps=2))
    return losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single, mode):
    out = tmp_path / mode
    _torchrun(out, *(["--fsdp"] if mode == "fsdp" else []))
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s, ref in single.items():
        assert abs(got[s] - ref) <= TOL, (mode, s, got[s], ref)
    # the final checkpoint is a whole model written once, with the global data position
    import torch

    state = torch.load(out / "model" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["loader"]["position"] == STEPS * BATCH * 32
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fsdp"] == (mode == "fsdp")


@pytest.mark.slow
def test_sft_two_processes_match_one(tmp_path, ckpt):
    """SFT runs on the same core: 2 ranks × 4 packed rows == one process, 2 micro-batches of 4."""
    from nanoseek.train.sft import SFTConfig, sft

    args = dict(data="builtin:sft-arith?n=40", max_steps=STEPS, warmup_steps=1, batch_size=BATCH, seq_len=128, logging_steps=1)
    sft(SFTConfig(ckpt=str(ckpt), out=str(tmp_path / "one"), gradient_accumulation_steps=2, progress=False, **args))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "nanoseek.cli", "sft",
           "--ckpt", str(ckpt), "--out", str(tmp_path / "two"), "--progress", "false", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for s in one:
        assert abs(one[s] - two[s]) <= TOL, (s, one[s], two[s])


# GRPO: 4 prompts × G = 2 per step, 2 prompt groups on each rank; rollouts, rewards, eval and
# the update all split across the ranks (eval_problems=5: the shares are uneven)
GRPO_ARGS = dict(task="arithmetic", task_args={"digits": 2}, prompts_per_step=4, num_generations=2,
                 max_completion_length=6, max_steps=3, learning_rate=1e-3, eval_steps=2, eval_problems=5,
                 save_steps=2, reward_funcs=["test_train_dist:parity_reward"],
                 num_iterations=2, beta=0.04,  # μ = 2: the second pass moves the ratio off 1 (clip stats, k3 KL)
                 mask_truncated_completions=False,  # a random model never stops: its completions still train
                 dtype="float32", seed=0)


def parity_reward(completions, problems, **kw):
    """Whether the text's length is odd: a group of two completions ties about half the time, so
    dynamic sampling drops groups on one rank and not on the other."""
    return [float(len(c) % 2) for c in completions]


def _weights(run):
    from nanoseek.checkpoint import load_pretrained

    return load_pretrained(run / "model").state_dict()


@pytest.mark.slow
def test_grpo_two_processes_match_one(tmp_path, ckpt):
    """GRPO under torchrun: each rank rolls out its slice of the step's problems with the seeds
    one process gives them, the normalisers (dapo's tokens, dynamic sampling's surviving groups)
    are the whole batch's, so per-step metrics and final weights equal one process's — with
    steps where a rank's groups were all dropped (it runs no micro-batch, yet steps alike)."""
    import warnings

    import torch

    from nanoseek.train.grpo import GRPOConfig, grpo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grpo(GRPOConfig(ckpt=str(ckpt), out=str(tmp_path / "one"), **GRPO_ARGS))
    flags = [f"--{k.replace('_', '-')}={json.dumps(v) if isinstance(v, dict) else v}"
             for k, v in GRPO_ARGS.items() if k != "reward_funcs"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "nanoseek.cli", "grpo",
           "--ckpt", str(ckpt), "--out", str(tmp_path / "two"), "--reward-funcs", *GRPO_ARGS["reward_funcs"], *flags]
    tests = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = rows("one"), rows("two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 2, 3, 3]  # eval at 0, 2 and the end
    timing = {"elapsed_s", "eta_s", "tokens_per_s", "rollout_s", "update_s"}
    for a, b in zip(one, two):
        assert sorted(a) == sorted(b)
        for k in sorted(set(a) - timing):
            if isinstance(a[k], float):
                assert abs(a[k] - b[k]) <= TOL, (a["step"], k, a[k], b[k])
            else:
                assert a[k] == b[k], (a["step"], k, a[k], b[k])
    steps = [r for r in one if "reward" in r]
    assert any(0 < r["frac_reward_zero_std"] < 1 for r in steps)  # dynamic sampling dropped some groups
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0, msg=k)
    state = torch.load(tmp_path / "two" / "model" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 3
    assert (tmp_path / "two" / "checkpoints" / "step_000002").is_dir() and (tmp_path / "two" / "grpo.png").is_file()
