"""Report cards, built from the runs' own files: a stage's RUN/report.md with its plots, and a
pipeline's (runs/<name>/report.md) collecting every stage in it.

A stage calls `write_report(run_dir, title, evals=...)` when it ends: that records the machine it
ran on (RUN/machine.json), plots the losses and writes the stage's card. `nanoseek report RUN`
rebuilds the card of a stage, or of a pipeline directory whose subdirectories are stages (the
demo's tokenizer/, pretrain/, sft/, grpo/, ...), from what they hold: config.json, metrics.jsonl,
eval.json, machine.json, model/config.json, the PNGs, and a pipeline's summary.json. Each stage
shows its command line (the knobs that matter and those set away from their defaults), the
machine, parameters and activated parameters, tokens, wall time, the held-out figures, the plots,
and what it cost: its measured MFU and accelerator-hours by the cost model (nanoseek/cost.py).
matplotlib runs on the Agg backend: no display needed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .train.rundir import read_metrics

MACHINE = "machine.json"
# knobs shown on a stage's command line whenever its config has them (others only when changed)
KEY_FIELDS = ("preset", "ckpt", "teacher", "student", "data", "task", "task_args", "max_steps", "epochs",
              "batch_size", "seq_len", "prompts_per_step", "num_generations", "max_completion_length",
              "learning_rate", "seed")
NOISE = {"out", "resume", "overwrite", "progress", "logging_steps", "save_steps", "keep_last"}


# ---------------------------------------------------------------------- plots
def plot_losses(records: list[dict], png: str | Path, title: str = "") -> Path | None:
    """Training loss (total and main-head) and validation loss against step; and, for MoE runs, the
    mean expert-load max violation on a second panel. Returns the path, or None with no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train:
        return None
    viol = [r for r in train if "max_violation_mean" in r]
    fig, axes = plt.subplots(1, 2 if viol else 1, figsize=(11 if viol else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (total)", lw=1)
    if any("lm_loss" in r for r in train):
        pts = [(r["step"], r["lm_loss"]) for r in train if "lm_loss" in r]
        ax.plot(*zip(*pts), label="train next-token loss", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if all(r["loss"] > 0 for r in train):  # GRPO's loss changes sign
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "loss")
    if viol:
        ax2 = axes[0][1]
        ax2.plot([r["step"] for r in viol], [r["max_violation_mean"] for r in viol], lw=1)
        ax2.set_xlabel("step")
        ax2.set_ylabel("max_load / mean_load − 1 (mean over MoE layers)")
        ax2.set_title("expert-load max violation")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------- what a stage holds
@dataclass
class Stage:
    """The facts of one stage's run directory, read from its files."""

    path: Path
    kind: str  # the command that wrote it (pretrain, sft, grpo, ...), or "tokenizer"
    config: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)  # the command's defaults, when the command is known
    records: list[dict] = field(default_factory=list)
    evals: dict = field(default_factory=dict)  # eval.json
    machine: dict | None = None  # machine.json: what ran it
    rows: list[tuple[str, str]] = field(default_factory=list)  # (what, value) for the card
    figures: dict = field(default_factory=dict)  # the numbers behind the rows (tests read them)

    @property
    def train(self) -> list[dict]:
        return [r for r in self.records if "tokens" in r]  # the core's per-step records


def _command_of(run: Path, config: dict) -> tuple[str, dict]:
    """(command name, its config's defaults): the registered command whose config fields are
    exactly the keys of RUN/config.json, trying the one named like the directory first."""
    from . import cli

    specs = {**cli.COMMANDS, **{f"{g} {n}": s for g, c in cli.GROUPS.items() for n, s in c.items()}}
    for name in sorted(specs, key=lambda n: n != run.name):
        try:
            cls = getattr(importlib.import_module(specs[name][0]), specs[name][1].split(":")[0])
        except (ImportError, AttributeError):
            continue
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        if set(fields) == set(config):
            return name, {n: f.default if f.default is not dataclasses.MISSING else
                          (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                          for n, f in fields.items()}
    return run.name, {}


def read_stage(run: str | Path) -> Stage:
    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        if (run / "tokenizer.json").is_file():
            return Stage(run, "tokenizer")
        if not (run / "metrics.jsonl").is_file():
            raise ValueError(f"{run}: not a run directory (no config.json or metrics.jsonl)")
    def load(name: str, default):
        path = run / name
        try:
            return json.loads(path.read_text()) if path.is_file() else default
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None

    config = load("config.json", {})
    kind, defaults = _command_of(run, config) if config else (run.name, {})
    try:
        records = read_metrics(run)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{run / 'metrics.jsonl'}: a line is not valid JSON ({e})") from None
    return Stage(run, kind, config, defaults, records, load("eval.json", {}), load(MACHINE, None))


def command_line(st: Stage) -> str:
    """The stage as a command: its key knobs, and every other one set away from its default."""
    parts = [f"nanoseek {st.kind}"]
    for k, v in st.config.items():
        changed = bool(st.defaults) and st.defaults.get(k) != v
        if k in NOISE or v is None or not (k in KEY_FIELDS or changed):
            continue
        if isinstance(v, bool):
            val = str(v).lower()
        elif isinstance(v, (list, tuple)):
            val = " ".join(shlex.quote(str(x)) for x in v)
        elif isinstance(v, dict):
            val = shlex.quote(json.dumps(v))
        else:
            val = shlex.quote(str(v))
        parts.append(f"--{k.replace('_', '-')} {val}")
    return " ".join(parts)


def heldout(st: Stage) -> dict:
    """The stage's held-out figures: eval.json's accuracy, the last validation / eval record of
    each metric (val_*, eval_*, arith_accuracy)."""
    out: dict = {}
    if "accuracy" in st.evals:  # the same figure as metrics' arith_accuracy, with its sample count
        out["held-out accuracy"] = (st.evals["accuracy"], st.evals.get("n"))
    for r in st.records:
        for k, v in r.items():
            if isinstance(v, (int, float)) and k != "val_tokens" and (
                    k.startswith(("val_", "eval_")) or (k == "arith_accuracy" and not st.evals)):
                out[k] = (v, r.get("step"))
    return out


def _fmt(k: str, v: float) -> str:
    return f"{v:.1%}" if "accuracy" in k or "format" in k or "truncated" in k else f"{v:.4g}"


def flops_per_token(st: Stage, c, seq: int) -> tuple[float, str]:
    """FLOPs one of the stage's counted tokens costs, and what that counts."""
    from .cost import training_flops
    from .counting import count, human

    if st.kind == "grpo":  # tokens = generated completion tokens: a rollout forward and an update
        return 8 * c.matmul_params, "8·N per generated token (rollout 2·N + update 6·N; prompts, attention not counted)"
    mtp = st.kind == "pretrain" and st.config.get("mtp_weight", 0) > 0 and c.mtp_flops_per_token > 0
    flops, what = training_flops(c, mtp), f"6·N + attention at seq {seq}" + (" + MTP" if mtp else "")
    teacher = st.config.get("teacher")
    if teacher and st.config.get("loss", "sft") != "sft":  # logit distillation runs the teacher forward too
        try:
            from .checkpoint import resolve_ckpt
            from .config import ModelConfig

            tc = count(ModelConfig.load(resolve_ckpt(teacher) / "config.json"), seq)
            flops += 2 * tc.matmul_params + tc.attention_flops_per_token / 3
            what += f" + the teacher's forward ({human(tc.activated)} activated)"
        except (OSError, ValueError):
            what += " (the teacher's forward not counted: its checkpoint is not here)"
    return flops, what


@functools.lru_cache(maxsize=None)
def this_machine(threads: int) -> dict:
    """The machine building the card: what a run that recorded none is said to have run on. Not
    probed: a peak measured now, under today's load, says nothing of the run's MFU."""
    from .cost import machine

    return machine(threads, probe=False)


def analyse(st: Stage, price_per_hour: float) -> Stage:
    """Fill st.rows and st.figures: machine, model, tokens, wall time, MFU and cost, held-out."""
    from .cost import peak_of, usd
    from .counting import count, human

    rows, fig = st.rows, st.figures
    rows.clear()
    if st.kind == "tokenizer":
        from .tokenizer import Tokenizer

        fig["vocab_size"] = Tokenizer.load(st.path).vocab_size
        rows.append(("vocabulary", f"{fig['vocab_size']} ids (byte-level BPE, digits split, chat and <think> tokens)"))
        return st
    rows.append(("command", f"`{command_line(st)}`"))
    if st.machine:
        m, recorded = st.machine, True
    else:  # the run's threads: its --threads, or torch's default (one per core)
        import os

        m, recorded = this_machine(int(st.config.get("threads") or os.cpu_count() or 1)), False
    if m:
        gpu = f", {m['gpu']}" if m.get("gpu") else ""
        procs = m.get("processes", 1)
        rows.append(("machine", f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s){gpu}, torch "
                     f"{m['torch']}" + (f", {procs} processes" if procs > 1 else "")
                     + ("" if recorded else " (not recorded with the run: the machine that built this card)")))
    mcfg = st.path / "model" / "config.json"
    c = None
    seq = int(st.config.get("seq_len") or 1)
    if mcfg.is_file():
        from .config import ModelConfig

        c = count(ModelConfig.load(mcfg), seq)
        fig.update(parameters=c.total, activated=c.activated)
        rows.append(("parameters", f"{human(c.total)}, {human(c.activated)} activated per token"
                     + (f" (+ MTP {human(c.mtp)} on disk)" if c.mtp else "")))
    train = st.train
    if train:
        last = train[-1]
        fig.update(tokens=last["tokens"], steps=last["step"], elapsed_s=last.get("elapsed_s"))
        what = "generated tokens" if st.kind == "grpo" else "tokens"
        rows.append(("tokens", f"{last['tokens']:,} {what} in {last['step']} steps"))
        if last.get("elapsed_s"):
            s = last["elapsed_s"]
            rows.append(("wall time", f"{s / 60:.1f} min ({s:,.4g} s, training and its evaluations)"))
            rows.append(("throughput", f"{last['tokens'] / s:,.0f} {what}/s"))
        if "loss" in last:
            rows.append(("final training loss", f"{last['loss']:.4g}" + (
                f" (next-token {last['lm_loss']:.4g})" if last.get("lm_loss") is not None else "")))
        if "max_violation_mean" in last:
            rows.append(("expert-load max violation", f"{last['max_violation_mean']:.3g} (mean over MoE layers)"))
    for k, (v, at) in heldout(st).items():
        fig[k] = v
        at = f" of {at}" if k == "held-out accuracy" and at else f" (step {at})" if at is not None else ""
        rows.append((k.replace("_", " "), _fmt(k, v) + at))
    if c is not None and train and train[-1].get("elapsed_s") and m:
        s = train[-1]["elapsed_s"]
        flops, what = flops_per_token(st, c, seq)
        peak, peak_what = peak_of(m, st.config.get("dtype", "auto"))
        procs = m.get("processes", 1)
        hours = s / 3600 * procs
        fig.update(flops_per_token=flops, hours=hours, usd=hours * price_per_hour)
        if peak:
            fig["mfu"] = train[-1]["tokens"] / s * flops / (peak * procs)
            rows.append(("MFU", f"{fig['mfu']:.2%} of the {peak_what} ({peak / 1e9:,.0f} GFLOP/s), at "
                         f"{human(flops)} FLOPs per token: {what}"))
        else:
            rows.append(("MFU", f"not measured: {peak_what if recorded else 'the run recorded no machine.json'} "
                         f"({human(flops)} FLOPs per token: {what})"))
        unit = "GPU-hours" if m.get("gpu") else "CPU-hours"
        rows.append(("cost", f"{hours:.3g} {unit}, {usd(hours * price_per_hour)} at ${price_per_hour:.2f}/hour"))
    return st


def stage_card(st: Stage, title: str, level: int = 1, link: str = "") -> list[str]:
    """The markdown of one stage: heading, plots, the figures table. `link` prefixes file links
    (a pipeline card links into the stage's directory)."""
    lines = [f"{'#' * level} {title}", ""]
    for png in sorted(st.path.glob("*.png")):
        lines += [f"![{st.kind} {png.stem}]({link}{png.name})", ""]
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in st.rows), ""]
    return lines


def write_report(run_dir: str | Path, title: str = "", evals: dict | None = None, record_machine: bool = True,
                 price_per_hour: float | None = None) -> Path:
    """RUN/report.md (+ RUN/loss.png) from the run's files; at a stage's end (record_machine)
    RUN/machine.json first, so the card says what ran it however late it is rebuilt."""
    from .cost import V3_PRICE, machine

    run = Path(run_dir)
    if record_machine:
        import os

        m = {**machine(), "processes": int(os.environ.get("WORLD_SIZE", "1"))}
        (run / MACHINE).write_text(json.dumps(m, indent=2) + "\n")
    st = analyse(read_stage(run), V3_PRICE if price_per_hour is None else price_per_hour)
    return _write_card(st, title, evals)


def _write_card(st: Stage, title: str, evals: dict | None = None) -> Path:
    """RUN/loss.png and RUN/report.md of an analysed stage."""
    run = st.path
    plot_losses(st.records, run / "loss.png", title)
    lines = stage_card(st, title or run.name)
    evals = evals or st.evals
    if evals and evals.get("samples"):
        lines += [f"## Held-out samples (greedy; accuracy {evals['accuracy']:.1%} of {evals['n']})", ""]
        for prompt, cont, truth, ok in evals["samples"]:
            lines += ["```", f"{prompt}{cont}", "```", f"truth {truth}: {'✓' if ok else '✗'}", ""]
    if st.config:
        lines += ["## Config", "", "```json", json.dumps(st.config, indent=2), "```"]
    out = run / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


# ---------------------------------------------------------------------- a pipeline
def _title(run: Path) -> str:
    """A stage card's title: the heading its stage wrote, when it wrote one."""
    rep = run / "report.md"
    first = rep.read_text().split("\n", 1)[0] if rep.is_file() else ""
    return (first[2:].strip() if first.startswith("# ") else "") or run.name


def stages_of(root: Path, summary: list[dict]) -> list[Path]:
    """A pipeline's stage directories: the tokenizer first, then the order of summary.json, then
    the order they were made in."""
    dirs = [d for d in root.iterdir() if d.is_dir() and any((d / f).is_file() for f in
                                                            ("config.json", "metrics.jsonl", "tokenizer.json"))]
    order = {r["stage"]: i for i, r in enumerate(summary)}

    def made(d: Path) -> float:
        return min((d / f).stat().st_mtime for f in ("config.json", "metrics.jsonl", "tokenizer.json")
                   if (d / f).is_file())

    return sorted(dirs, key=lambda d: (not (d / "tokenizer.json").is_file() or (d / "config.json").is_file(),
                                       order.get(d.name, len(order)), made(d)))


def _summary(root: Path) -> list[dict]:
    p = root / "summary.json"
    try:
        rows = json.loads(p.read_text()) if p.is_file() else []
    except json.JSONDecodeError:
        raise ValueError(f"{p}: not valid JSON") from None
    return [r for r in rows if isinstance(r, dict) and "stage" in r]


def write_pipeline_report(root: str | Path, price_per_hour: float | None = None) -> Path:
    """ROOT/report.md: a summary table of every stage, the machine, then each stage's card (its
    own report.md is rebuilt beside it)."""
    from .cost import V3_PRICE, usd
    from .counting import human

    root = Path(root)
    price = V3_PRICE if price_per_hour is None else price_per_hour
    rows = _summary(root)
    dirs = stages_of(root, rows)
    if not dirs:
        raise ValueError(f"{root}: holds no stage run directories (config.json, metrics.jsonl or tokenizer.json)")
    summary = {r["stage"]: r for r in rows}
    stages, titles = [], []
    for d in dirs:
        st = analyse(read_stage(d), price)
        stages.append(st)
        titles.append(_title(d) if st.kind != "tokenizer" else "tokenizer")
        if st.kind != "tokenizer":
            _write_card(st, titles[-1])
    lines = [f"# Report card: {root.name}", "",
             f"Built by `nanoseek report {root}` from each stage's own files. Cost at ${price:.2f} per "
             "accelerator-hour (`--price-per-hour`); MFU against each machine's peak (a GPU's datasheet, a "
             "CPU's matmul probe).", "",
             "| stage | held-out | parameters (activated) | tokens | wall time | MFU | cost |",
             "|---|---|---|---|---|---|---|"]
    tot_s = tot_usd = tot_tok = 0.0
    for st in stages:
        f = st.figures
        name = st.path.name
        fig = summary.get(name, {}).get("figure") or "; ".join(
            f"{k.replace('_', ' ')} {_fmt(k, v)}" for k, (v, _) in heldout(st).items()) or (
            f"vocab {f['vocab_size']}" if "vocab_size" in f else "")
        params = f"{human(f['parameters'])} ({human(f['activated'])})" if "parameters" in f else ""
        minutes = summary.get(name, {}).get("minutes") or (f["elapsed_s"] / 60 if f.get("elapsed_s") else None)
        tot_s += (minutes or 0) * 60
        tot_usd += f.get("usd", 0)
        tot_tok += f.get("tokens", 0)
        cells = [f"[{name}]({name}/report.md)" if st.kind != "tokenizer" else name, fig, params,
                 human(f["tokens"]) if "tokens" in f else "", f"{minutes:.1f} min" if minutes else "",
                 f"{f['mfu']:.2%}" if "mfu" in f else "", usd(f["usd"]) if "usd" in f else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"| all | | | {human(tot_tok)} | {tot_s / 60:.1f} min | | {usd(tot_usd)} |", ""]
    if summary:
        lines += ["Held-out figures and minutes of the stages the pipeline's summary.json lists are its own "
                  "(minutes include the stage's final evaluation).", ""]
    for st, title in zip(stages, titles):
        lines += stage_card(st, title if title.startswith(st.path.name) else f"{st.path.name}: {title}", 2,
                            link=f"{st.path.name}/")
        if st.config:
            lines += [f"Full config: [{st.path.name}/config.json]({st.path.name}/config.json); "
                      f"card: [{st.path.name}/report.md]({st.path.name}/report.md).", ""]
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out


# ---------------------------------------------------------------------- the command
@dataclass
class ReportConfig:
    run: str = field(metadata={"help": "a pipeline directory (runs/demo: one subdirectory per stage) or one "
                               "stage's run directory", "positional": True})
    price_per_hour: float = field(default=2.0, metadata={"help": "USD per accelerator-hour for the cost rows"})

    def __post_init__(self):
        p = Path(self.run)
        if not p.is_dir():
            raise ValueError(f"RUN {self.run}: {'is a file' if p.exists() else 'no such directory'}; give a run "
                             "or pipeline directory")
        if not 0 <= self.price_per_hour < float("inf"):
            raise ValueError(f"--price-per-hour {self.price_per_hour}: must be a finite number ≥ 0")


def report(cfg: ReportConfig) -> Path:
    """Rebuild RUN/report.md: a stage's card, or a pipeline's with every stage's figures and plots."""
    run = Path(cfg.run)
    if (run / "config.json").is_file() or (run / "metrics.jsonl").is_file():
        out = write_report(run, _title(run), record_machine=False, price_per_hour=cfg.price_per_hour)
    else:
        out = write_pipeline_report(run, cfg.price_per_hour)
    print(f"wrote {out}")
    return out
