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

    args = dict(data="builtin:sft-arith?n=40", max_steps=STEPS, batch_size=BATCH, seq_len=128, logging_steps=1)
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
