"""The training loop every stage shares: pretrain, SFT, GRPO and distillation differ only in the
batches they feed it and the loss they compute from them.

What lives here, once:

* distributed setup: one process, or `torchrun` with DDP (gloo on CPU, nccl on CUDA) or FSDP2
  (`fully_shard`, `--fsdp`). Each rank reads its own slice of the global batch;
* the optimizer: AdamW β = (0.9, 0.95), weight decay on matrices only (V3 paper §4.2) — norms,
  biases and embeddings are not decayed, since shrinking them only fights the data;
* the schedule: linear warmup, then cosine or WSD (warmup-stable-decay) to min_lr_ratio·lr;
* a step: gradient accumulation over micro-batches, clipping, autocast, the optimizer step, and
  then the auxiliary-loss-free router-bias update with γ (the bias is not a parameter, so it is
  nudged after the step, from the expert loads every rank counted during its forwards);
* metrics.jsonl + a tqdm bar (loss, lr, tokens/s, ETA, expert-load max violation per layer);
* checkpoints: HF directories (save_pretrained + tokenizer files + trainer_state.pt with the
  optimizer, step, data position and RNG), written atomically, keeping the last K; `resume`
  continues bit-exactly on CPU; Ctrl-C saves a checkpoint and exits cleanly.

Use it as:

    trainer = Trainer(cfg, model, tokenizer=tok)       # cfg: a TrainConfig (or subclass)
    trainer.fit(loader, loss_fn, evaluate=fn)           # loss_fn(model, batch) -> (loss, {name: tensor})

or drive `trainer.train_step(micro_batches, loss_fn)` yourself (GRPO does, between rollouts).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

Batch = Any  # whatever the loader yields; the loss function knows its shape
LossFn = Callable[[nn.Module, Batch], "tuple[torch.Tensor, dict[str, torch.Tensor | float | None]]"]
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"


# ---------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Knobs every training stage shares (stages subclass this and add their own)."""

    out: str = field(default="runs/train", metadata={"help": "run directory (checkpoints, metrics, report)"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "global batch in sequences per optimizer step (all ranks)"})
    micro_batch_size: int = field(default=0, metadata={"help": "sequences per forward on one rank; 0 = the rank's whole share"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of the peak"})
    schedule: str = field(default="cosine", metadata={"help": "lr schedule after warmup", "choices": ["cosine", "wsd", "constant"]})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    decay_fraction: float = field(default=0.2, metadata={"help": "WSD: the last fraction of steps decays"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices (not norms/embeddings/biases)"})
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm; 0 = no clipping"})
    router_gamma: float = field(default=0.001, metadata={"help": "γ of the aux-loss-free router-bias update; 0 = off"})
    dtype: str = field(default="auto", metadata={"help": "autocast dtype; auto = bfloat16 on CUDA, float32 on CPU (bfloat16 is ~1.4x faster on AVX512-BF16/AMX CPUs)",
                                                  "choices": ["auto", "float32", "bfloat16"]})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 = torch's default. On a CPU shared with "
                                                       "other jobs, 1 avoids OpenMP spin-wait contention"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard with FSDP2 instead of DDP"})
    seed: int = 0
    log_every: int = field(default=10, metadata={"help": "steps between metrics.jsonl records"})
    eval_every: int = field(default=0, metadata={"help": "steps between evaluations; 0 = only at the end"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints; 0 = only the final one"})
    keep_last: int = field(default=2, metadata={"help": "periodic checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


# ---------------------------------------------------------------------- distributed
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group.

    Without torchrun this is a single process. The backend follows the device: nccl for CUDA,
    gloo for CPU, so the same command runs on a laptop and on a GPU node.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistEnv(rank, world, local, dev)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. `auto` picks bf16 on CUDA and fp32 on CPU.

    On a CPU with native bf16 (AVX512-BF16, AMX) `--dtype bfloat16` trains ~1.4× faster (the
    small preset, fresh batches: 499 vs 713 ms per fwd+bwd; docs/benchmarks.md), but it is not the default there:
    the demo's bf16-pretrained bases, though as good on the pretraining eval (48–71% vs 54.5–92%),
    came out of the cold-start SFT at 0.5–7.5% on 3-digit addition against 30.5–36% for fp32
    ones (docs/pretraining.md) — the digit-copying lookups seem to need the fp32 precision."""
    if name == "float32" or (name == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(amp: torch.dtype | None, device: torch.device):
    """The context a forward runs in: torch.autocast(amp), or plain fp32 when amp is None."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def _all_reduce_mean(values: list[float], env: DistEnv) -> list[float]:
    if not env.distributed or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return (t / env.world_size).tolist()


# ---------------------------------------------------------------------- optimizer and schedule
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (≥ 2-D, not embeddings) decay; norms, biases, embeddings don't."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=1e-8)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """lr for optimizer step `step` (0-based): warmup, then cosine / WSD / constant to min_lr."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":  # hold the peak, then decay linearly over the last decay_fraction
        start = int(cfg.steps * (1 - cfg.decay_fraction))
        if step < start:
            return peak
        frac = (step - start) / max(1, cfg.steps - start)
        return peak + (floor - peak) * min(1.0, frac)
    if cfg.schedule == "cosine":
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    raise ValueError(f"--schedule {cfg.schedule!r}: choose cosine, wsd or constant")


# ---------------------------------------------------------------------- RNG
def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Owns the (wrapped) model, the optimizer, the step counter, logging and checkpoints.

    `model` is the plain module (a DeepSeekV3); `trainer.model` stays that module, and
    `trainer.wrapped` is what forwards go through (DDP / FSDP2 / compiled).
    `tokenizer` (optional) is saved into every checkpoint so each is a complete HF directory.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, tokenizer=None, env: DistEnv | None = None,
                 find_unused_parameters: bool = False):
        self.cfg = cfg
        self.env = env or init_distributed(cfg.device)
        self.device = self.env.device
        self.out = Path(cfg.out)
        self.tokenizer = tokenizer
        self.amp = autocast_dtype(cfg.dtype, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = model.to(self.device)
        self.model.train()
        self.wrapped: nn.Module = self.model
        if self.env.distributed and cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            # shard block by block (each is gathered just for its own forward/backward), then the root.
            # An MTP module is not sharded as a whole: its head norm runs outside its forward
            # (shared_head_logits), so only its decoder block gets its own group.
            blocks = [*getattr(model, "layers", []), *(m.block for m in getattr(model, "mtp", []))]
            for block in blocks:
                fully_shard(block)
            fully_shard(model)
        elif self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # broadcast_buffers=False: the per-rank expert-load counters are buffers and must stay
            # per-rank (update_router_bias all-reduces them); the router bias is kept identical by
            # that same all-reduced update.
            self.wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               broadcast_buffers=False, find_unused_parameters=find_unused_parameters)
        if cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.optimizer = build_optimizer(self.model, cfg)
        self.step = 0
        self.tokens_seen = 0
        self._bar = None

    # ------------------------------------------------------------------ one optimizer step
    def autocast(self):
        return autocast(self.amp, self.device)

    def split(self, batch: Batch) -> list[Batch]:
        """Cut this rank's batch (a tensor or tuple of tensors) into micro-batches along dim 0."""
        mb = self.cfg.micro_batch_size
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = first.shape[0]
        if not mb or mb >= n:
            return [batch]
        if n % mb:
            raise ValueError(f"--micro-batch-size {mb} does not divide the per-rank batch of {n} sequences")
        if isinstance(batch, (tuple, list)):
            return [type(batch)(t[i:i + mb] for t in batch) for i in range(0, n, mb)]
        return [batch[i:i + mb] for i in range(0, n, mb)]

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> dict[str, Any]:
        """Accumulate gradients over `micro_batches` (this rank's), clip, step, update router bias.

        The loss of each micro-batch is divided by their number, so the gradient is that of the
        mean loss; DDP/FSDP average across ranks. Returns the step's metrics, averaged over
        micro-batches and ranks: loss, every named value loss_fn returned, lr, grad_norm, and
        for MoE models `max_violation` (one value per MoE layer).
        """
        cfg, model = self.cfg, self.wrapped
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        n = len(micro_batches)
        sums: dict[str, float] = {}
        ddp = hasattr(model, "no_sync")
        for i, mb in enumerate(micro_batches):
            last = i == n - 1
            if cfg.fsdp and self.env.distributed:
                self.model.set_requires_gradient_sync(last)
            with (model.no_sync() if ddp and not last else nullcontext()):
                with self.autocast():
                    loss, named = loss_fn(model, self._to_device(mb))
                (loss / n).backward()
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in named.items():
                if v is not None:
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            first = mb[0] if isinstance(mb, (tuple, list)) else mb
            self.tokens_seen += first.numel() * self.env.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        violations = None
        if hasattr(self.model, "update_router_bias"):
            violations = self.model.update_router_bias(cfg.router_gamma)
        self.step += 1
        keys = sorted(sums)
        means = _all_reduce_mean([sums[k] / n for k in keys], self.env)
        out: dict[str, Any] = dict(zip(keys, means))
        out.update(lr=lr, grad_norm=float(grad_norm))
        if violations:
            out["max_violation"] = [round(v, 4) for v in violations]
        return out

    def _to_device(self, mb: Batch) -> Batch:
        if torch.is_tensor(mb):
            return mb.to(self.device, non_blocking=True)
        if isinstance(mb, (tuple, list)):
            return type(mb)(self._to_device(t) for t in mb)
        if isinstance(mb, dict):
            return {k: self._to_device(v) for k, v in mb.items()}
        return mb

    # ------------------------------------------------------------------ the loop
    def fit(self, loader, loss_fn: LossFn, evaluate: Callable[["Trainer"], dict] | None = None,
            on_step: Callable[["Trainer", dict], None] | None = None) -> Path:
        """Train until cfg.steps, from a resume point if cfg.resume. Returns the final checkpoint dir.

        `loader.next()` gives this rank's batch; `loader.state_dict()` is saved with checkpoints.
        `evaluate(trainer)` runs every eval_every steps and at the end; its dict is logged.
        `on_step(trainer, metrics)` runs after each step (tests use it to interrupt a run).
        Ctrl-C (KeyboardInterrupt) saves a checkpoint of the last finished step and re-raises.
        """
        cfg = self.cfg
        if cfg.resume:
            state = self.resume()
            if state is not None and "loader" in state:
                loader.load_state_dict(state["loader"])
        self._trim_metrics()
        loader_state = loader.state_dict()
        t_start, t_last, tok_last, step_last = time.time(), time.time(), self.tokens_seen, self.step
        start_step = self.step
        self._open_bar()
        try:
            while self.step < cfg.steps:
                m = self.train_step(self.split(loader.next()), loss_fn)
                loader_state = loader.state_dict()  # the position *after* this finished step
                now = time.time()
                rate = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                eta = (now - t_start) / (self.step - start_step) * (cfg.steps - self.step)
                if self._bar is not None:
                    self._bar.update(1)
                    self._bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.1e}", tok_s=f"{rate:.0f}")
                if self.step % cfg.log_every == 0 or self.step in (1, cfg.steps):
                    mv = m.get("max_violation")
                    self.log({"step": self.step, **m, "tokens": self.tokens_seen, "tokens_per_s": round(rate, 1),
                              "elapsed_s": round(now - t_start, 2), "eta_s": round(eta, 1),
                              **({"max_violation_mean": round(sum(mv) / len(mv), 4)} if mv else {})})
                    t_last, tok_last, step_last = now, self.tokens_seen, self.step
                if evaluate and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.log({"step": self.step, **evaluate(self)})
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save(self.out / CHECKPOINTS / f"step_{self.step:06d}", loader_state)
                    self._prune()
                if on_step is not None:
                    on_step(self, m)
        except KeyboardInterrupt:
            self._close_bar()
            if self.step > start_step or cfg.resume:
                path = self.save(self.out / CHECKPOINTS / f"step_{self.step:06d}", loader_state)
                if self.env.is_main:
                    print(f"\ninterrupted: saved {path}; continue with --resume", flush=True)
            raise
        self._close_bar()
        if evaluate:
            self.log({"step": self.step, **evaluate(self)})
        return self.save(self.out / "final", loader_state)

    def _open_bar(self):
        if self.cfg.progress and self.env.is_main:
            from tqdm import tqdm

            self._bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.out.name, dynamic_ncols=True)

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ logging
    def log(self, record: dict) -> None:
        """Append one JSON line to RUN/metrics.jsonl (main rank only)."""
        if not self.env.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._bar is None and self.cfg.progress and "loss" in record:
            print(f"step {record['step']}: loss {record['loss']:.4f}", flush=True)

    def _trim_metrics(self) -> None:
        """On resume, drop records from beyond the checkpoint (steps the crashed run will redo)."""
        path = self.out / "metrics.jsonl"
        if not self.env.is_main or not path.exists():
            return
        if not self.cfg.resume:
            path.unlink()
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        path.write_text("".join(k + "\n" for k in keep))

    # ------------------------------------------------------------------ checkpoints
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU (gathered from every rank under FSDP2; collective)."""
        if self.cfg.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def _optimizer_state(self) -> dict:
        if self.cfg.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save(self, path: Path, loader_state: dict | None = None, extra_state: dict | None = None) -> Path:
        """Write a complete HF checkpoint dir + trainer_state.pt, atomically. Every rank must call."""
        from ..checkpoint import save_pretrained

        path = Path(path)
        weights = self.full_state_dict()
        optim = self._optimizer_state()
        if self.env.is_main:
            plain = self.model
            if self.cfg.fsdp and self.env.distributed:  # a plain CPU copy to write from
                plain = type(self.model)(self.model.config)
                plain.load_state_dict(weights)
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "optimizer": optim,
                     "loader": loader_state, "rng": rng_state(), "world_size": self.env.world_size,
                     "config": dataclasses.asdict(self.cfg), **(extra_state or {})}
            extra: dict[str, object] = {STATE_FILE: lambda d: torch.save(state, d / STATE_FILE)}
            if self.tokenizer is not None:
                extra["tokenizer.json"] = lambda d: self.tokenizer.save(d)
            save_pretrained(plain, path, extra=extra)
        if self.env.distributed:
            dist.barrier()
        return path

    def _prune(self) -> None:
        if not self.env.is_main:
            return
        ckpts = sorted((self.out / CHECKPOINTS).glob("step_*"))
        for old in ckpts[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        """The resumable checkpoint with the highest step in RUN (periodic ones, or final/)."""
        found = []
        for d in [*(self.out / CHECKPOINTS).glob("step_*"), self.out / "final"]:
            if (d / STATE_FILE).exists():
                step = int(d.name[5:]) if d.name.startswith("step_") else \
                    torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)["step"]
                found.append((step, d))
        return max(found)[1] if found else None

    def resume(self, path: str | Path | None = None) -> dict | None:
        """Load weights, optimizer, step and RNG from `path` (default: the newest checkpoint).

        Returns the saved trainer state (its "loader" entry restores the data position), or None
        when there is nothing to resume from (a fresh run).
        """
        from ..checkpoint import _read_weights, load_state

        path = Path(path) if path else self.latest_checkpoint()
        if path is None:
            if self.env.is_main:
                print(f"--resume: no checkpoint in {self.out}, starting fresh", flush=True)
            return None
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        plain = type(self.model)(self.model.config)
        load_state(plain, _read_weights(path), path)
        weights = plain.state_dict()
        if self.cfg.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, weights, options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        set_rng_state(state["rng"])
        if self.env.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)
        return state
