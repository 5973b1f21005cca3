"""Where a training run executes — device, precision, CPU threads, process group — chosen once.

Every stage calls `init_runtime(cfg)` before it builds anything, so the same three flags
(`--device`, `--dtype`, `--threads`) mean the same thing in pretraining, SFT and GRPO, and a
`torchrun` launch joins its process group in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    """This process's place in the run: rank, world size, device and autocast dtype."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    amp: torch.dtype | None = None  # None = plain fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        return autocast(self.amp, self.device)


def init_runtime(device: str = "auto", dtype: str = "auto", threads: int = 0) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), join the process group, set
    the CPU threads, and pick the autocast dtype.

    Without torchrun this is a single process. The backend follows the device: nccl for CUDA,
    gloo for CPU, so the same command runs on a laptop and on a GPU node.
    """
    if threads:
        torch.set_num_threads(threads)
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(rank, world, local, dev, autocast_dtype(dtype, dev))


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. `auto` picks bf16 on CUDA and fp32 on CPU.

    On a CPU with native bf16 (AVX512-BF16, AMX) `--dtype bfloat16` trains faster
    (docs/benchmarks.md), but it is not the default there: bf16-pretrained bases came out of the
    cold-start SFT far worse at 3-digit addition than fp32 ones (docs/pretraining.md) — the
    digit-copying lookups seem to need the fp32 precision."""
    if name == "float32" or (name == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(amp: torch.dtype | None, device: torch.device):
    """The context a forward runs in: torch.autocast(amp), or plain fp32 when amp is None."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def all_reduce_mean(values: list[float], rt: Runtime) -> list[float]:
    """The mean over ranks of each value (identity in one process)."""
    if not rt.distributed or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return (t / rt.world_size).tolist()


def all_reduce_sum(values: list[float], rt: Runtime) -> list[float]:
    """The sum over ranks of each value (identity in one process): counts that normalise a
    batch split across ranks (tokens, sequences) must be the whole batch's."""
    if not rt.distributed or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Every rank's rows of `t` (the same shape on each), concatenated in rank order along dim 0:
    the whole batch as one process would hold it, when rank r holds the r-th contiguous slice."""
    if not rt.distributed:
        return t
    comm = rt.device if rt.device.type == "cuda" else torch.device("cpu")
    parts = [torch.empty_like(t, device=comm) for _ in range(rt.world_size)]
    dist.all_gather(parts, t.to(comm))
    return torch.cat(parts).to(t.device)
