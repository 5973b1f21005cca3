"""The run's report card: a loss-curve PNG and report.md, built from RUN/metrics.jsonl.

Every stage logs the same way (Trainer.log), so one reader serves them all: a stage calls
`write_report(run_dir, title, evals=...)`, and a pipeline (the demo) can list several stages'
reports in one page with `summary_line`. matplotlib runs on the Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path

from .train.rundir import read_metrics


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


def summary(records: list[dict]) -> dict:
    """Last values of the headline metrics, and totals."""
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    out: dict = {}
    if train:
        last = train[-1]
        out.update(step=last["step"], loss=last["loss"], lm_loss=last.get("lm_loss"),
                   tokens=last.get("tokens"), elapsed_s=last.get("elapsed_s"),
                   max_violation=last.get("max_violation"))
        rates = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
        if rates:
            out["tokens_per_s"] = round(sum(rates) / len(rates), 1)
    if val:
        out.update(val_loss=val[-1]["val_loss"], val_bpb=val[-1].get("val_bpb"))
    for r in records:
        if "arith_accuracy" in r:
            out["arith_accuracy"] = r["arith_accuracy"]
    return out


def write_report(run_dir: str | Path, title: str = "", evals: dict | None = None) -> Path:
    """RUN/report.md + RUN/loss.png from RUN/metrics.jsonl (and RUN/config.json when present)."""
    run = Path(run_dir)
    records = read_metrics(run)
    png = plot_losses(records, run / "loss.png", title)
    s = summary(records)
    lines = [f"# {title or run.name}", ""]
    if png:
        lines += [f"![loss curve]({png.name})", ""]
    lines += ["| metric | value |", "|---|---|"]
    for k, v in s.items():
        if v is not None:
            lines.append(f"| {k} | {v} |")
    if evals and evals.get("samples"):
        lines += ["", f"## Held-out samples (greedy; accuracy {evals['accuracy']:.1%} of {evals['n']})", ""]
        for prompt, cont, truth, ok in evals["samples"]:
            lines += ["```", f"{prompt}{cont}", "```", f"truth {truth}: {'✓' if ok else '✗'}", ""]
    cfg = run / "config.json"
    if cfg.exists():
        lines += ["", "## Config", "", "```json", cfg.read_text().strip(), "```"]
    out = run / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
