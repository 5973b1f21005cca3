"""The run directory every training stage writes, and the rules that keep it trustworthy.

    RUN/config.json        the resolved command config (what `--resume` reads back)
    RUN/metrics.jsonl      one JSON record per logged step, evaluation or final score
    RUN/checkpoints/step_N the last K resumable checkpoints (HF dir + trainer_state.pt)
    RUN/model/             the result: an HF checkpoint with its tokenizer (and trainer_state.pt)
    RUN/report.md, *.png   the report card

A fresh run never writes into a directory that holds something: it would mix two runs' metrics
and checkpoints (and, sorted by step, prune the new ones). `--resume` continues the run the
directory holds, from its own config; a flag given again overrides it, unless it changes the
schedule the checkpoints were trained under.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from ..checkpoint import RUN_MODEL

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MODEL = RUN_MODEL
CHECKPOINTS = "checkpoints"


def save_run_config(cfg: Any, out_dir: str | Path) -> Path:
    """Write the resolved config of a run beside its outputs, so the run can be repeated."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    return path


def read_run_config(out_dir: str | Path) -> dict:
    path = Path(out_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist; nothing to resume (drop --resume to start a run)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume: {path} is not valid JSON ({e}); it is not a run's config") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: {path} holds a JSON {type(saved).__name__}, not a run's config")
    return saved


def check_fresh(out_dir: str | Path) -> None:
    """Refuse a fresh run into a directory that already holds files (touching nothing)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: is a file; a run's output is a directory")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} already holds a run: pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")


def clear(out_dir: str | Path) -> None:
    """--overwrite: remove what an earlier run left in the directory."""
    out = Path(out_dir)
    if out.is_dir():
        shutil.rmtree(out)


def check_schedule(saved: dict, cfg: Any, fields: tuple[str, ...]) -> None:
    """Refuse a resume whose config changes the learning-rate schedule or the batch: the
    checkpoint's optimizer state and step count only mean what they did under the old one."""
    changed = [f for f in fields if f in saved and saved[f] != getattr(cfg, f)]
    if changed:
        what = ", ".join(f"--{f.replace('_', '-')} {saved[f]} → {getattr(cfg, f)}" for f in changed)
        raise ValueError(f"--resume would change the schedule of the run in {cfg.out} ({what}); "
                         "start a new run (another --out) to train under a different one")


# ---------------------------------------------------------------------- metrics
def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of RUN/metrics.jsonl, in order (empty when there is none)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def append_metrics(run_dir: str | Path, record: dict) -> None:
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(run_dir: str | Path, step: int) -> None:
    """On resume, drop the records from beyond the checkpoint (steps the resumed run redoes)."""
    path = Path(run_dir) / METRICS
    if path.exists():
        keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))
