"""`nanoseek compress --sweep`: every method × setting, measured on this machine.

For each variant in SWEEP (and the original): its size on disk, the peak memory of a process that
loads it into the engine and decodes, decode tokens/s at batch 1 and at batch 32 (greedy, a fixed
number of tokens after fixed prompts, process CPU time, best of two), held-out accuracy (greedy
pass@1 on `--task`, as `nanoseek eval --temperature 0` scores it) and validation loss and bits
per byte on `--calib`'s held-out stream. Speed and memory are measured in a fresh process per variant, so no
variant inherits another's allocations or warm caches.

Writes OUT/sweep.json, OUT/sweep.md (the table) and OUT/pareto.png (accuracy against batch-1
speed, the Pareto front joined), with each variant's checkpoint under OUT/variants/. `--budget P`
names the fastest variant (batch-1 tokens/s) whose accuracy is at most P points below the
original's.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

# label, method, overrides of CompressConfig
SWEEP: list[tuple[str, str, dict]] = [
    ("fp8", "fp8", {}),
    ("int8", "int8", {}),
    ("int4-g128", "int4", {"group_size": 128}),
    ("int4-g32", "int4", {"group_size": 32}),
    ("magnitude-50%", "magnitude", {"sparsity": 0.5}),
    ("wanda-50%", "wanda", {"sparsity": 0.5}),
    ("magnitude-2:4", "magnitude", {"pattern": "2:4"}),
    ("wanda-2:4", "wanda", {"pattern": "2:4"}),
    ("experts-25%", "experts", {"sparsity": 0.25}),
]
DECODE_TOKENS = 32
BATCHES = (1, 32)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(path: str, tokens: int = DECODE_TOKENS, batches=BATCHES, reps: int = 2) -> dict:
    """In this process: load `path` into the engine, decode `tokens` greedy tokens after fixed
    prompts at each batch size; tokens/s from process CPU time (best of `reps`), peak RSS."""
    import time

    import torch

    from ..engine import Engine, SamplingParams

    engine = Engine(path, device="cpu")
    V = engine.config.vocab_size
    g = torch.Generator().manual_seed(0)
    out = {}
    for B in batches:
        prompts = [torch.randint(8, V, (16,), generator=g).tolist() for _ in range(B)]
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.process_time()
            engine.generate(prompts, params)
            best = min(best, time.process_time() - t)
        out[f"tok_s_b{B}"] = B * tokens / best
    out["peak_mib"] = peak_rss() / 2**20
    return out


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: unlike getrusage's ru_maxrss it
    restarts at exec, so a child does not inherit its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_in_child(path: Path) -> dict:
    code = ("import json, sys; from nanoseek.compress.sweep import measure; "
            f"print(json.dumps(measure({str(path)!r}, {DECODE_TOKENS}, {tuple(BATCHES)})))")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"measuring {path} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def score(path: Path, cfg, tok) -> dict:
    """Held-out accuracy (greedy pass@1, percent) and validation loss / bits per byte."""
    from ..checkpoint import load_pretrained
    from ..eval.tasks import EvalConfig, evaluate_task
    from .calib import validation

    acc = evaluate_task(EvalConfig(ckpt=str(path), task=cfg.task, task_args=cfg.task_args, n=cfg.n,
                                   temperature=0.0, seed=cfg.seed + 1234, device="cpu"))
    val = validation(load_pretrained(path), tok, cfg)
    return {"accuracy": 100 * acc["pass@1"], "val_loss": val["val_loss"], "val_bpb": val["val_bpb"]}


def pareto(rows: list[dict], x: str = "tok_s_b1", y: str = "accuracy") -> list[dict]:
    """The rows no other row beats on both x and y (higher is better on both)."""
    return [r for r in rows if not any(o[x] >= r[x] and o[y] >= r[y] and (o[x] > r[x] or o[y] > r[y])
                                       for o in rows)]


def pick(rows: list[dict], budget: float) -> dict:
    """The fastest row (batch-1 tokens/s) whose accuracy is within `budget` points of the original's."""
    base = rows[0]["accuracy"]
    ok = [r for r in rows if r["accuracy"] >= base - budget]
    return max(ok, key=lambda r: r["tok_s_b1"])


def columns() -> list[tuple[str, str, str]]:
    """(header, row key, format) of the table's columns."""
    return [("variant", "variant", "{}"), ("MiB on disk", "mib", "{:.2f}"), ("peak MiB", "peak_mib", "{:.0f}"),
            *((f"tok/s b{B}", f"tok_s_b{B}", "{:.1f}") for B in BATCHES),
            ("accuracy %", "accuracy", "{:.1f}"), ("val loss", "val_loss", "{:.4f}"), ("val bpb", "val_bpb", "{:.4f}")]


def table(rows: list[dict]) -> str:
    cols = columns()
    head = "| " + " | ".join(c[0] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(f.format(r[k]) for _, k, f in cols) + " |\n" for r in rows)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    front = sorted(pareto(rows), key=lambda r: r["tok_s_b1"])
    ax.plot([r["tok_s_b1"] for r in front], [r["accuracy"] for r in front], "-", color="tab:orange",
            label="Pareto front", zorder=1)
    sizes = [max(20.0, 600 * r["mib"] / max(q["mib"] for q in rows)) for r in rows]
    ax.scatter([r["tok_s_b1"] for r in rows], [r["accuracy"] for r in rows], s=sizes, zorder=2,
               color="tab:blue", alpha=0.7)
    for r in rows:
        ax.annotate(r["variant"], (r["tok_s_b1"], r["accuracy"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("decode tokens/s, batch 1")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(cfg) -> dict:
    """Compress `cfg.ckpt` every SWEEP way into OUT/variants/, measure each, write the table and plot."""
    from ..checkpoint import ckpt_flag
    from ..tokenizer import Tokenizer
    from . import compress
    from .save import weight_bytes

    src = ckpt_flag(cfg.ckpt)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / "sweep.json").is_file():
        raise FileExistsError(f"--out {out}: exists and is not a sweep directory")
    tok = Tokenizer.load(src)
    variants = [("original", None, src)]
    for label, method, over in SWEEP:
        d = out / "variants" / label
        compress(replace(cfg, sweep=False, method=method, out=str(d), budget=None, **over))
        variants.append((label, method, d))
    rows = []
    for label, method, d in variants:
        row = {"variant": label, "method": method or "fp32", "mib": weight_bytes(d) / 2**20}
        row.update(measure_in_child(d))
        row.update(score(d, cfg, tok))
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = f"{cpu_model()}, {os.environ.get('OMP_NUM_THREADS', '?')} thread(s)"
    res = {"ckpt": str(src), "task": cfg.task, "n": cfg.n, "calib": cfg.calib, "machine": machine,
           "decode_tokens": DECODE_TOKENS, "rows": rows, "pareto": [r["variant"] for r in pareto(rows)]}
    if cfg.budget is not None:
        res["budget"] = {"points": cfg.budget, "pick": pick(rows, cfg.budget)["variant"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(res, indent=2) + "\n")
    md = table(rows)
    (out / "sweep.md").write_text(md)
    plot(rows, out / "pareto.png", f"{Path(cfg.ckpt).name}: accuracy against speed on {machine}")
    print(md)
    if "budget" in res:
        print(f"--budget {cfg.budget}: {res['budget']['pick']}")
    return res
