"""The training core every stage shares: pretraining, SFT and GRPO differ only in the batches
they feed it and the loss (or, for GRPO, the step) they compute from them.

What lives here, once:

* the run's start (`start_run`): the runtime (device, dtype, threads, process group), a refusal
  to write a fresh run into a directory that holds one, the resumed config's schedule check,
  leftovers of interrupted checkpoint writes removed, RUN/config.json written;
* the optimizer: AdamW, weight decay on matrices only (V3 paper §4.2) — norms, biases and
  embeddings are not decayed, since shrinking them only fights the data;
* the schedule: linear warmup, then cosine, WSD (warmup-stable-decay) or constant;
* a step: gradient accumulation over micro-batches, autocast, clipping, the optimizer step, and
  an optimizer step hook with the auxiliary-loss-free router-bias update (γ): the bias is not a
  parameter, so it is nudged after each step from the expert loads every rank counted;
* DDP (gloo on CPU, nccl on CUDA) or FSDP2 (`fully_shard`, `--fsdp`) under torchrun;
* metrics.jsonl + a tqdm bar, periodic evaluation, a wall-clock budget (`--max-minutes`);
* checkpoints: HF directories (save_pretrained + tokenizer + trainer_state.pt with the optimizer,
  step, data position and RNG), written atomically, the last K kept; `--resume` continues
  bit-exactly on CPU; Ctrl-C and SIGTERM (a cluster's preemption) finish the step, save, exit.

Use it as:

    rt = start_run(cfg)                                  # cfg: a TrainConfig subclass
    trainer = Trainer(cfg, model, tokenizer=tok, rt=rt)
    trainer.fit(loader, loss_fn, evaluate=fn)           # loss_fn(model, batch) -> (loss, {name: tensor})

or pass `step_fn=` to fit and call `trainer.train_step` from it (GRPO does, after its rollouts).
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import rundir
from .rundir import CHECKPOINTS, MODEL
from .runtime import Runtime, all_reduce_mean, init_runtime

Batch = Any  # whatever the loader yields; the loss function knows its shape
LossFn = Callable[[nn.Module, Batch], "tuple[torch.Tensor, dict[str, torch.Tensor | float | None]]"]
STATE_FILE = "trainer_state.pt"


# ---------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Knobs every training stage shares, under Hugging Face / TRL names (stages subclass this,
    override defaults and add their own)."""

    # fields that fix the learning-rate schedule or the batch: a resume may not change them
    SCHEDULE_FIELDS: ClassVar[tuple[str, ...]] = ("max_steps", "learning_rate", "warmup_steps", "schedule",
                                                  "min_lr_ratio", "decay_fraction")
    MIN_STEPS: ClassVar[int] = 1  # SFT allows 0: the steps then follow from --epochs

    out: str = field(default="runs/train", metadata={"help": "run directory (config, metrics, checkpoints, model, report)"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    max_minutes: float = field(default=0.0, metadata={"help": "wall-clock budget of this invocation; at the limit the run ends "
                                                      "as if finished (eval, RUN/model); 0 = none"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    schedule: str = field(default="cosine", metadata={"help": "lr schedule after warmup", "choices": ["cosine", "wsd", "constant"]})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of the peak (cosine, wsd)"})
    decay_fraction: float = field(default=0.2, metadata={"help": "WSD: the last fraction of steps decays"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices (not norms/embeddings/biases)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW β1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW β2"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0 = no clipping"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step on each rank"})
    router_gamma: float = field(default=0.001, metadata={"help": "γ of the aux-loss-free router-bias update after each step; 0 = off"})
    balance_alpha: float = field(default=1e-4, metadata={"help": "α of the sequence-wise balance loss; 0 = off"})
    dtype: str = field(default="auto", metadata={"help": "autocast dtype; auto = bfloat16 on CUDA, float32 on CPU (docs/pretraining.md "
                                                 "says why bfloat16 is not the CPU default)", "choices": ["auto", "float32", "bfloat16"]})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 = torch's default. On a CPU shared with "
                                                       "other jobs, 1 avoids OpenMP spin-wait contention"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard with FSDP2 instead of DDP"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights, the data order and sampling"})
    logging_steps: int = field(default=10, metadata={"help": "steps between metrics.jsonl records"})
    eval_steps: int = field(default=0, metadata={"help": "steps between evaluations; 0 = only at the end"})
    save_steps: int = field(default=0, metadata={"help": "steps between resumable checkpoints; 0 = only RUN/model at the end"})
    keep_last: int = field(default=2, metadata={"help": "periodic checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its newest checkpoint, with its "
                                                  "config.json (flags given again override it)"})
    overwrite: bool = field(default=False, metadata={"help": "delete what --out holds and start afresh"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        """Every bad value is refused here, in one line naming the flag and the range it takes,
        before a run directory is written or a model built (NaN fails every comparison, so the
        float checks also refuse it; ±inf is refused where a finite number is needed)."""
        def need(ok: bool, flag: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(self, flag)}: {msg}")

        need(self.max_steps >= self.MIN_STEPS, "max_steps", f"must be ≥ {self.MIN_STEPS}")
        need(self.max_minutes >= 0, "max_minutes", "must be ≥ 0 (0 = no limit)")
        need(0 < self.learning_rate < math.inf, "learning_rate", "must be a finite number > 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be ≥ 0")
        need(not self.max_steps or self.warmup_steps <= self.max_steps, "warmup_steps",
             f"must be ≤ --max-steps {self.max_steps} (the whole run would be warmup)")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(0 < self.decay_fraction <= 1, "decay_fraction", "must be in (0, 1]")
        need(0 <= self.weight_decay < math.inf, "weight_decay", "must be a finite number ≥ 0")
        need(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        need(0 <= self.max_grad_norm < math.inf, "max_grad_norm", "must be a finite number ≥ 0 (0 = no clipping)")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be ≥ 1")
        need(0 <= self.router_gamma < math.inf, "router_gamma", "must be a finite number ≥ 0")
        need(0 <= self.balance_alpha < math.inf, "balance_alpha", "must be a finite number ≥ 0")
        need(self.threads >= 0, "threads", "must be ≥ 0 (0 = torch's default)")
        need(self.logging_steps >= 1, "logging_steps", "must be ≥ 1")
        for name in ("eval_steps", "save_steps", "keep_last"):
            need(getattr(self, name) >= 0, name, "must be ≥ 0")
        for name in ("batch_size", "seq_len"):  # the stages that read token batches have these
            if hasattr(self, name):
                need(getattr(self, name) >= 1, name, "must be ≥ 1")
        if hasattr(self, "batch_size"):  # each step's batch is cut into that many micro-batches
            need(self.batch_size % self.gradient_accumulation_steps == 0, "batch_size",
                 f"must be a multiple of --gradient-accumulation-steps {self.gradient_accumulation_steps}")
        if self.device != "auto":
            from ..engine.engine import check_device

            check_device(self.device)
        if Path(self.out).is_file():
            raise FileExistsError(f"--out {self.out}: is a file; a run's output is a directory")


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
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                             betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """lr for optimizer step `step` (0-based): warmup, then cosine / WSD / constant to min_lr."""
    peak, floor, total = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, cfg.max_steps
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":  # hold the peak, then decay linearly over the last decay_fraction
        start = int(total * (1 - cfg.decay_fraction))
        if step < start:
            return peak
        frac = (step - start) / max(1, total - start)
        return peak + (floor - peak) * min(1.0, frac)
    if cfg.schedule == "cosine":
        frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    raise ValueError(f"--schedule {cfg.schedule!r}: choose cosine, wsd or constant")


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """V3's sequence-wise balance loss (before α) of the last training forward's main-model MoE
    layers, for stages whose loss is not the model's own `forward(targets)` (SFT, GRPO)."""
    from ..model.moe import MoE

    model = getattr(model, "module", model)  # under DDP the module it wraps
    parts = [layer.mlp.balance_loss for layer in getattr(model, "layers", [])
             if isinstance(layer.mlp, MoE) and layer.mlp.balance_loss is not None]
    return torch.stack(parts).mean() if parts else None


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


# ---------------------------------------------------------------------- the run's start
def start_run(cfg: TrainConfig) -> Runtime:
    """Everything a stage does before it builds anything, so that a refused run touches nothing:
    join the runtime, refuse a fresh run into an occupied --out (or clear it with --overwrite),
    check a resume keeps the schedule, remove interrupted writes, save RUN/config.json, seed."""
    from ..checkpoint import remove_stale_writes

    rt = init_runtime(cfg.device, cfg.dtype, cfg.threads)
    out = Path(cfg.out)
    if cfg.resume:
        if (out / rundir.CONFIG).is_file():
            rundir.check_schedule(rundir.read_run_config(out), cfg, type(cfg).SCHEDULE_FIELDS)
    elif cfg.overwrite:
        if rt.is_main:
            rundir.clear(out)
    else:
        rundir.check_fresh(out)
    if rt.distributed:  # every rank has checked before the main one writes
        dist.barrier()
    if rt.is_main:
        for d in (out, out / CHECKPOINTS):
            remove_stale_writes(d)
        rundir.save_run_config(cfg, out)
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    return rt


class _Stop(KeyboardInterrupt):
    """A signal (Ctrl-C, SIGTERM) asked the run to stop after the step it was in."""


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Owns the (wrapped) model, the optimizer, the step counter, logging and checkpoints.

    `model` is the plain module (a DeepSeekV3); `trainer.model` stays that module, and
    `trainer.wrapped` is what forwards run through (DDP / FSDP2 / compiled).

    `grad_sync="all_reduce"` (data parallel without the DDP wrapper) is for a stage whose
    forward is not the module's own — DDP's reducer arms only in `DDP.forward`, and GRPO's
    shared-prefix pass never calls it — and whose ranks may run different numbers of
    micro-batches in a step (dynamic sampling drops groups rank by rank): the gradients are
    averaged over ranks in one all-reduce after the last micro-batch, whatever each rank ran.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, tokenizer=None, rt: Runtime | None = None,
                 find_unused_parameters: bool = False, optimizer: torch.optim.Optimizer | None = None,
                 grad_sync: str = "ddp"):
        self.cfg = cfg
        self.rt = rt or init_runtime(cfg.device, cfg.dtype, cfg.threads)
        self.device = self.rt.device
        self.amp = self.rt.amp
        self.out = Path(cfg.out)
        self.tokenizer = tokenizer
        self.model = model.to(self.device)
        self.model.train()
        self.wrapped: nn.Module = self.model
        if grad_sync not in ("ddp", "all_reduce"):
            raise ValueError(f"grad_sync must be 'ddp' or 'all_reduce', got {grad_sync!r}")
        self.all_reduce_grads = grad_sync == "all_reduce" and self.rt.distributed
        if self.all_reduce_grads:
            if cfg.fsdp:
                raise ValueError("--fsdp: this stage's forward is not the module's own, so it cannot be sharded; "
                                 "drop --fsdp (its ranks keep whole replicas and average gradients)")
            for t in self.model.state_dict().values():  # every rank starts from rank 0's weights, as DDP does
                dist.broadcast(t, 0)
        elif self.rt.distributed and cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            # shard block by block (each is gathered just for its own forward/backward), then the root.
            # An MTP module is not sharded as a whole: its head norm runs outside its forward
            # (shared_head_logits), so only its decoder block gets its own group.
            blocks = [*getattr(model, "layers", []), *(m.block for m in getattr(model, "mtp", []))]
            for block in blocks:
                fully_shard(block)
            fully_shard(model)
        elif self.rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # broadcast_buffers=False: the per-rank expert-load counters are buffers and must stay
            # per-rank (update_router_bias all-reduces them); the router bias is kept identical by
            # that same all-reduced update.
            self.wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               broadcast_buffers=False, find_unused_parameters=find_unused_parameters)
        if cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        self.optimizer = optimizer or build_optimizer(self.model, cfg)
        # the router-bias update as an optimizer step hook (torchtitan's pattern): it follows every
        # optimizer step, however a stage drives the steps
        self.optimizer.register_step_post_hook(lambda *_: self._update_router_bias())
        self.violations: list[float] | None = None
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0  # seconds of earlier invocations of a resumed run
        self.data = None  # what fit() reads from; its state_dict() is the data position
        self._mark_state: tuple[dict | None, dict] = (None, rng_state())
        self._bar = None
        self._signal: int | None = None

    def _update_router_bias(self) -> None:
        if hasattr(self.model, "update_router_bias"):
            self.violations = self.model.update_router_bias(self.cfg.router_gamma)

    # ------------------------------------------------------------------ one optimizer step
    def autocast(self):
        return self.rt.autocast()

    def split(self, batch: Batch) -> list[Batch]:
        """Cut this rank's batch (a tensor or tuple of tensors) into gradient_accumulation_steps
        micro-batches along dim 0."""
        k = self.cfg.gradient_accumulation_steps
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = first.shape[0]
        if k == 1:
            return [batch]
        if n % k:
            raise ValueError(f"--gradient-accumulation-steps {k} does not divide the per-rank batch of {n} sequences")
        mb = n // k
        if isinstance(batch, (tuple, list)):
            return [type(batch)(t[i:i + mb] for t in batch) for i in range(0, n, mb)]
        return [batch[i:i + mb] for i in range(0, n, mb)]

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn, weights: list[float] | None = None,
                   advance: bool = True) -> dict[str, Any]:
        """Accumulate gradients over `micro_batches` (this rank's), clip, step (the router-bias
        hook follows), and count the step when `advance`.

        Each micro-batch's loss is divided by their number (the gradient of the mean loss), or
        multiplied by `weights[i]` when a stage normalises over the whole batch itself (GRPO).
        DDP/FSDP (and `grad_sync="all_reduce"`) average across ranks; under the latter a rank may
        pass fewer micro-batches than another, or none, and the step is taken when any rank had
        one (the names loss_fn returns must then be the same on every rank that ran one).
        `advance=False` keeps the schedule's step: GRPO's μ updates of one rollout batch share one lr. Returns the step's metrics, averaged over
        micro-batches and ranks: loss, every named value loss_fn returned, lr, grad_norm, and for
        MoE models `max_violation` (one value per MoE layer). No micro-batches: no update.
        """
        cfg, model = self.cfg, self.wrapped
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        n = len(micro_batches)
        sums: dict[str, float] = {}
        ddp = hasattr(model, "no_sync")
        self.violations = None
        for i, mb in enumerate(micro_batches):
            last = i == n - 1
            if cfg.fsdp and self.rt.distributed:
                self.model.set_requires_gradient_sync(last)
            with (model.no_sync() if ddp and not last else nullcontext()):
                with self.autocast():
                    loss, named = loss_fn(model, self._to_device(mb))
                (loss / n if weights is None else loss * weights[i]).backward()
            w = 1.0 if weights is None else weights[i] * n
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * w
            for k, v in named.items():
                if v is not None:
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * w
            first = mb[0] if isinstance(mb, (tuple, list)) else mb
            if torch.is_tensor(first):
                self.tokens_seen += first.numel() * self.rt.world_size
        ran = self._all_reduce_grads(n) if self.all_reduce_grads else n
        if ran:  # ranks that ran nothing still report the loss, so every rank reduces the same values
            sums.setdefault("loss", 0.0)
        grad_norm = 0.0
        if ran:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if advance:
            self.step += 1
        keys = sorted(sums)
        means = all_reduce_mean([sums[k] / max(n, 1) for k in keys], self.rt)
        out: dict[str, Any] = dict(zip(keys, means))
        out.update(lr=lr, grad_norm=float(grad_norm))
        if self.violations:
            out["max_violation"] = [round(v, 4) for v in self.violations]
        return out

    def _all_reduce_grads(self, n: int) -> int:
        """Average every gradient over ranks in one all-reduce; return the micro-batches all ranks ran.

        A parameter no rank reached keeps grad None, as in one process (AdamW then leaves it and
        its moments alone, e.g. the MTP modules GRPO never runs); one that only some ranks
        reached counts as zero on the others."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        comm = self.device if self.device.type == "cuda" else torch.device("cpu")
        flat = torch.cat([*(torch.zeros(p.numel(), device=comm) if p.grad is None else p.grad.detach().float().flatten()
                            for p in params),
                          torch.tensor([float(p.grad is not None) for p in params] + [float(n)], device=comm)])
        dist.all_reduce(flat)
        sizes = [p.numel() for p in params]
        grads = flat[:sum(sizes)] / self.rt.world_size
        reached, ran = flat[sum(sizes):-1].tolist(), int(flat[-1])
        for p, g, hit in zip(params, grads.split(sizes), reached):
            p.grad = g.view_as(p).to(p.dtype).clone() if hit else None
        return ran

    def _to_device(self, mb: Batch) -> Batch:
        if torch.is_tensor(mb):
            return mb.to(self.device, non_blocking=True)
        if isinstance(mb, (tuple, list)):
            return type(mb)(self._to_device(t) for t in mb)
        if isinstance(mb, dict):
            return {k: self._to_device(v) for k, v in mb.items()}
        return mb

    # ------------------------------------------------------------------ the loop
    def fit(self, data, loss_fn: LossFn | None = None, *, step_fn: Callable[["Trainer"], dict] | None = None,
            evaluate: Callable[["Trainer"], dict] | None = None,
            on_step: Callable[["Trainer", dict], None] | None = None, eval_at_start: bool = False) -> Path:
        """Train until max_steps (or --max-minutes), from a resume point if cfg.resume. Returns RUN/model.

        `data` gives this rank's batches (`data.next()`) unless `step_fn(trainer)` makes the
        whole step itself; `data.state_dict()` is saved with checkpoints. `evaluate(trainer)`
        runs every eval_steps, at the end (and at step 0 with `eval_at_start`); its dict is
        logged. `on_step(trainer, metrics)` runs after each step (tests use it to interrupt).
        A signal (Ctrl-C, SIGTERM) ends the step, saves a checkpoint and raises KeyboardInterrupt.
        """
        cfg = self.cfg
        self.data = data
        if cfg.resume:
            self.resume()
        if self.rt.is_main:
            rundir.trim_metrics(self.out, self.step)
        self._mark()
        if evaluate and eval_at_start and self.step == 0:
            self.log({"step": 0, "elapsed_s": 0.0, **evaluate(self)})
        t_start, t_last, tok_last = time.time(), time.time(), self.tokens_seen
        start_step = self.step
        self._open_bar()
        try:
            with self._signals():
                while self.step < cfg.max_steps:
                    m = step_fn(self) if step_fn else self.train_step(self.split(data.next()), loss_fn)
                    self._mark()
                    now = time.time()
                    rate = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                    eta = (now - t_start) / (self.step - start_step) * (cfg.max_steps - self.step)
                    if self._bar is not None:
                        self._bar.update(1)
                        self._bar.set_postfix(loss=f"{m.get('loss', float('nan')):.3f}", lr=f"{m['lr']:.1e}",
                                              tok_s=f"{rate:.0f}")
                    if self.step % cfg.logging_steps == 0 or self.step in (1, cfg.max_steps):
                        mv = m.get("max_violation")
                        self.log({"step": self.step, "tokens": self.tokens_seen, "tokens_per_s": round(rate, 1),
                                  "elapsed_s": round(self.elapsed_before + now - t_start, 2), "eta_s": round(eta, 1),
                                  **({"max_violation_mean": round(sum(mv) / len(mv), 4)} if mv else {}), **m})
                        t_last, tok_last = now, self.tokens_seen
                    if evaluate and cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < cfg.max_steps:
                        self.log({"step": self.step, **evaluate(self)})
                    if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                        self.save(self.out / CHECKPOINTS / f"step_{self.step:06d}")
                        self._prune()
                    if on_step is not None:
                        on_step(self, m)
                    signalled, out_of_time = self._agree(self._signal is not None,
                                                         bool(cfg.max_minutes) and now - t_start > cfg.max_minutes * 60)
                    if signalled:
                        raise _Stop
                    if out_of_time and self.step < cfg.max_steps:
                        if self.rt.is_main:
                            print(f"\n{self.out.name}: --max-minutes {cfg.max_minutes} reached at step {self.step}",
                                  flush=True)
                        break
        except KeyboardInterrupt:
            self._close_bar()
            if self.step > start_step or cfg.resume:
                path = self.save(self.out / CHECKPOINTS / f"step_{self.step:06d}")
                if self.rt.is_main:
                    print(f"\ninterrupted: saved {path}; continue with --resume", flush=True)
            raise
        self._close_bar()
        self.elapsed_before += time.time() - t_start
        if evaluate:
            self.log({"step": self.step, "elapsed_s": round(self.elapsed_before, 2), **evaluate(self)})
        return self.save(self.out / MODEL)

    def _mark(self) -> None:
        """Remember the data position and RNG *after* the last finished step: what an
        interrupted run's checkpoint must hold to continue exactly."""
        self._mark_state = (None if self.data is None else self.data.state_dict(), rng_state())

    def _agree(self, *flags: bool) -> list[bool]:
        """The flags, true on every rank when true on any (ranks must stop at the same step)."""
        if not self.rt.distributed:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    @contextmanager
    def _signals(self):
        """Ctrl-C and SIGTERM ask the run to stop after the current step (a second Ctrl-C stops at once)."""
        def ask(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = signum
            if self.rt.is_main:
                print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint", flush=True)

        try:
            old = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: signals stay with whoever owns them
            old = {}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _open_bar(self):
        if self.cfg.progress and self.rt.is_main:
            from tqdm import tqdm

            self._bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc=self.out.name, dynamic_ncols=True)

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ logging
    def log(self, record: dict) -> None:
        """Append one JSON line to RUN/metrics.jsonl (main rank only)."""
        if not self.rt.is_main:
            return
        rundir.append_metrics(self.out, record)
        if self._bar is None and self.cfg.progress and "loss" in record:
            print(f"step {record['step']}: loss {record['loss']:.4f}", flush=True)

    # ------------------------------------------------------------------ checkpoints
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU (gathered from every rank under FSDP2; collective)."""
        if self.cfg.fsdp and self.rt.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def _optimizer_state(self) -> dict:
        if self.cfg.fsdp and self.rt.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save(self, path: Path) -> Path:
        """Write a complete HF checkpoint dir + trainer_state.pt, atomically. Every rank must call."""
        from ..checkpoint import save_pretrained

        path = Path(path)
        weights = self.full_state_dict()
        optim = self._optimizer_state()
        if self.rt.is_main:
            plain = self.model
            if self.cfg.fsdp and self.rt.distributed:  # a plain CPU copy to write from
                plain = type(self.model)(self.model.config)
                plain.load_state_dict(weights)
            data_state, rng = self._mark_state
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "optimizer": optim,
                     "loader": data_state, "rng": rng, "world_size": self.rt.world_size,
                     "elapsed_s": self.elapsed_before, "config": dataclasses.asdict(self.cfg)}
            extra: dict[str, object] = {STATE_FILE: lambda d: torch.save(state, d / STATE_FILE)}
            if self.tokenizer is not None:
                extra["tokenizer.json"] = lambda d: self.tokenizer.save(d)
            save_pretrained(plain, path, extra=extra)
        if self.rt.distributed:
            dist.barrier()
        return path

    def _prune(self) -> None:
        if not self.rt.is_main:
            return
        ckpts = sorted((self.out / CHECKPOINTS).glob("step_*"))
        for old in ckpts[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        """The resumable checkpoint with the highest step in RUN (periodic ones, or model/)."""
        def saved_step(d: Path) -> int:  # mmap: the step without reading the optimizer state
            return int(torch.load(d / STATE_FILE, map_location="cpu", mmap=True, weights_only=False)["step"])

        found = [d for d in [*(self.out / CHECKPOINTS).glob("step_*"), self.out / MODEL] if (d / STATE_FILE).is_file()]
        return max(found, key=saved_step) if found else None

    def resume(self, path: str | Path | None = None) -> dict | None:
        """Load weights, optimizer, step, RNG and the data position from `path` (default: the
        newest checkpoint). Returns the saved trainer state, or None when there is nothing to
        resume from (a fresh run, said aloud)."""
        from ..checkpoint import load_pretrained

        path = Path(path) if path else self.latest_checkpoint()
        if path is None:
            if self.rt.is_main:
                print(f"--resume: no checkpoint in {self.out}, starting fresh", flush=True)
            return None
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        rundir.check_schedule(state.get("config", {}), self.cfg, type(self.cfg).SCHEDULE_FIELDS)
        weights = load_pretrained(path).state_dict()  # validated on its way in, like any load
        if self.cfg.fsdp and self.rt.distributed:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, weights, options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        set_rng_state(state["rng"])
        if self.data is not None and state.get("loader") is not None:
            self.data.load_state_dict(state["loader"])
        if self.rt.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)
        return state
