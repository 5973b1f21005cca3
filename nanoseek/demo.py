"""`make demo`: the DeepSeek story end to end on a laptop CPU, one stage after another.

Each stage is a function of a shared `Demo` context and is listed in STAGES, so later stages
(SFT, GRPO, distillation, compression) append themselves without touching the earlier ones.
Everything lands in runs/demo/<stage>/. Re-running continues: a stage interrupted with Ctrl-C
resumes from its last checkpoint, and a finished one is not trained again.

    python -m nanoseek.demo              # all stages, seed 0, in runs/demo
    python -m nanoseek.demo --fresh      # delete runs/demo first
    python -m nanoseek.demo --seed 1     # the whole pipeline on another seed, in runs/demo-seed1

The seed sets everything random in every stage: the corpus, the initial weights, the SFT and
GRPO data order and rollouts. The held-out evaluation sets do not change with it, so the
figures of different seeds compare. The run ends with RUN/summary.md (each stage's figure and
minutes; docs/reasoning.md has the table of several seeds) and RUN/report.md, the pipeline's
report card (`nanoseek report RUN` rebuilds it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable



@dataclass
class Demo:
    root: Path = Path("runs/demo")
    seed: int = 0
    preset: str = "small"
    tokenizer: Path | None = None
    checkpoints: dict[str, Path] = field(default_factory=dict)  # stage → its final checkpoint
    results: list[dict] = field(default_factory=list)  # one row per stage: figure and minutes
    evals: dict[Path, dict] = field(default_factory=dict)  # checkpoint → its held-out eval (_task_eval)

    @property
    def data(self) -> str:
        """The pretraining corpus of this seed (the held-out test keys are never in any)."""
        return f"builtin:arith?seed={self.seed}"

    def __post_init__(self) -> None:
        # the rows of an earlier invocation, read before this one rewrites the file
        path = self.root / "summary.json"
        self._earlier = {r["stage"]: r for r in json.loads(path.read_text())} if path.is_file() else {}

    def record(self, stage: str, figure: str, seconds: float | None) -> None:
        """One summary row. seconds=None: the stage was done by an earlier invocation, whose
        minutes (from RUN/summary.json) are kept."""
        minutes = round(seconds / 60, 1) if seconds is not None else self._earlier.get(stage, {}).get("minutes")
        self.results.append({"stage": stage, "figure": figure, "minutes": minutes})
        (self.root / "summary.json").write_text(json.dumps(self.results, indent=2) + "\n")

    def write_summary(self) -> Path:
        """RUN/summary.md: the table docs/reasoning.md collects over seeds."""
        total = sum(r["minutes"] or 0 for r in self.results)
        lines = [f"# demo, seed {self.seed}", "", "| stage | figure | minutes |", "|---|---|---|",
                 *(f"| {r['stage']} | {r['figure']} | {r['minutes']} |" for r in self.results),
                 f"| all | | {total:.1f} |", ""]
        path = self.root / "summary.md"
        path.write_text("\n".join(lines))
        return path

    @property
    def latest(self) -> Path | None:
        """The most recent stage's checkpoint: what the next stage starts from and what is served."""
        return list(self.checkpoints.values())[-1] if self.checkpoints else None


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def stage_parity(demo: Demo) -> None:
    """Open weights, checked: a nanoseek checkpoint loads in transformers and back, same logits."""
    import nanoseek
    from .compat import transformers_roundtrip

    banner("open weights: tiny DeepSeek-V3 → transformers → nanoseek")
    try:
        import transformers  # noqa: F401  (a test dependency; `make` installs it)
    except ImportError:
        print("transformers is not installed; skipping the round trip")
        return
    r = transformers_roundtrip(nanoseek.load_model("tiny", seed=0))
    ok = max(r.max_abs_diff_hf, r.max_abs_diff_back) <= 1e-4 and r.same_greedy
    print(f"nanoseek vs transformers DeepseekV3ForCausalLM: max |Δlogits| {r.max_abs_diff_hf:.1e}; "
          f"after transformers' save_pretrained → nanoseek: {r.max_abs_diff_back:.1e}; "
          f"greedy continuations {'identical' if r.same_greedy else 'DIFFER'} → {'agree' if ok else 'DISAGREE'}")


def stage_tokenizer(demo: Demo) -> None:
    """Byte-level BPE with split digits, trained on the arithmetic corpus (vocab from the preset)."""
    from .config import preset
    from .tokenizer import TokenizerTrainConfig, train_tokenizer

    out = demo.root / "tokenizer"
    banner(f"tokenizer: byte-level BPE on {demo.data} → {out}")
    if not (out / "tokenizer.json").exists():
        train_tokenizer(TokenizerTrainConfig(data=f"{demo.data}&n=5000", out=str(out),
                                             vocab_size=preset(demo.preset).vocab_size))
    from .tokenizer import Tokenizer

    tok = Tokenizer.load(out)
    print(f"{tok.vocab_size} tokens; 'Q: 37+45' → {tok.encode('Q: 37+45')}")
    demo.tokenizer = out


def stage_pretrain(demo: Demo) -> None:
    """Pretrain the small MLA + MoE + MTP model; print greedy samples and held-out accuracy."""
    from .train.pretrain import PretrainConfig, pretrain

    out = demo.root / "pretrain"
    banner(f"pretrain: {demo.preset} on {demo.data} → {out}")
    cfg = PretrainConfig(preset=demo.preset, data=demo.data, seed=demo.seed, tokenizer=str(demo.tokenizer),
                         out=str(out), resume=True)
    done_before = (out / "eval.json").is_file()
    t = time.time()
    final = pretrain(cfg)
    print(f"pretraining took {time.time() - t:.0f} s; report: {out / 'report.md'}")
    trained = None if done_before else time.time() - t
    ev = json.loads((out / "eval.json").read_text())
    for prompt, cont, truth, ok in ev["samples"]:
        print("-" * 40)
        print(prompt + cont)
        print(f"[truth {truth}: {'correct' if ok else 'wrong'}]")
    print("-" * 40)
    print(f"held-out {ev['digits']}-digit addition, greedy: {ev['accuracy']:.1%} of {ev['n']} correct")
    demo.checkpoints["pretrain"] = final
    demo.record("pretrain", f"{ev['accuracy']:.1%} held-out 1-{ev['digits']}-digit addition (Q/A, greedy)", trained)


# ---- reasoning stages (SFT cold start → GRPO with verifiable rewards); see docs/reasoning.md
# cold start: 2000 chats with worked <think> traces, operands of 1-3 digits, one epoch (~90 steps):
# enough to carry the base's column addition into the chat form (fewer steps leave the format unlearnt)
SFT_DATA = "builtin:sft-arith?n=2000&digits=3&seed={seed}"
# GRPO's task: both operands of three digits, the hardest problems the cold start saw
GRPO_TASK = {"digits": 3, "min_digits": 3}


def _task_eval(demo: Demo, ckpt: Path, label: str) -> dict:
    """The held-out figure of `ckpt`, evaluated once per invocation (distill reports its teacher's again)."""
    from .eval.tasks import EvalConfig, evaluate_task

    if ckpt not in demo.evals:
        demo.evals[ckpt] = evaluate_task(EvalConfig(ckpt=str(ckpt), task="arithmetic", task_args=GRPO_TASK,
                                                    n=200, k=1, temperature=0.0))
    res = demo.evals[ckpt]
    print(f"{label}: held-out addition of two 3-digit numbers, greedy: {res['pass@1']:.1%} correct, "
          f"format {res['format']:.1%}")
    return res


def _figure(res: dict) -> str:
    return f"{res['pass@1']:.1%} held-out 3-digit + 3-digit addition (chat, greedy), format {res['format']:.0%}"


def stage_sft(demo: Demo) -> None:
    """Cold-start SFT: chats whose assistant turn thinks (column by column) then answers."""
    from .checkpoint import resolve_ckpt
    from .train.sft import SFTConfig, sft

    out = demo.root / "sft"
    data = SFT_DATA.format(seed=demo.seed)
    banner(f"sft: {data} → {out}")
    t = None
    if not (out / "model" / "config.json").exists():
        t = time.time()
        sft(SFTConfig(ckpt=str(demo.latest), data=data, out=str(out), epochs=1, seed=demo.seed, resume=True))
        t = time.time() - t
    demo.checkpoints["sft"] = resolve_ckpt(out)
    demo.record("sft", _figure(_task_eval(demo, demo.checkpoints["sft"], "after SFT")), t)


def stage_grpo(demo: Demo) -> None:
    """GRPO on 3-digit + 3-digit addition: accuracy + format rewards, engine rollouts, 5 minutes."""
    from .train.grpo import GRPOConfig, grpo

    out = demo.root / "grpo"
    banner(f"grpo: arithmetic {GRPO_TASK} from {demo.latest} → {out} (about 5 minutes on 2 cores)")
    t = None
    if not (out / "model" / "config.json").exists():
        t = time.time()
        grpo(GRPOConfig(ckpt=str(demo.latest), task="arithmetic", task_args=GRPO_TASK, out=str(out),
                        max_steps=300, max_minutes=5, prompts_per_step=16, num_generations=8,
                        max_completion_length=128, learning_rate=3e-5, temperature=1.0, epsilon_high=0.28,
                        reward_weights=[1.0, 0.2], eval_steps=20, seed=demo.seed, threads=2, resume=True))
        t = time.time() - t
    demo.checkpoints["grpo"] = out / "model"
    demo.record("grpo", _figure(_task_eval(demo, demo.checkpoints["grpo"], "after GRPO")), t)
    print(f"reward/accuracy plot: {out / 'grpo.png'}; per-step metrics: {out / 'metrics.jsonl'}")


# ---- R1-Distill: verified traces from the GRPO reasoner, then logit KD into a dense student with
# under a third of its parameters (see docs/distillation.md)
DISTILL_STUDENT = "dense-small"
# one sample per problem: the reasoner is nearly deterministic at temperature 1, so more samples of a
# problem come out identical (deduplicated); more problems is what adds data
DISTILL_TRACES = dict(n=10000, k=1, temperature=1.0, max_new_tokens=128)
# forward KL on the traces, 32 of them (94-111 tokens each) per step, ~2 epochs; the step count, not
# the minutes, ends the run (a cosine cut short by --max-minutes ends at a high learning rate)
DISTILL = dict(loss="kl", max_steps=600, max_minutes=15, batch_size=32, seq_len=160, learning_rate=3e-3,
               warmup_steps=30, weight_decay=0.0)


def stage_distill(demo: Demo) -> None:
    """Distil the reasoner: its verified traces, then forward-KL logit KD into a small dense student."""
    from .config import ModelConfig
    from .counting import count, human
    from .distill.traces import TRACES, TracesConfig, traces
    from .distill.train import DistillConfig, distill

    teacher = demo.checkpoints["grpo"]
    data, out = demo.root / "traces", demo.root / "distill"
    banner(f"distill: {DISTILL_STUDENT} from {teacher} on its verified traces → {out} "
           f"(training --max-minutes {DISTILL['max_minutes']})")
    t = None
    if not (out / "model" / "config.json").exists():
        t = time.time()
        if not (data / TRACES).is_file():
            traces(TracesConfig(teacher=str(teacher), task="arithmetic", task_args=GRPO_TASK, out=str(data),
                                seed=demo.seed, progress=False, **DISTILL_TRACES))
        distill(DistillConfig(teacher=str(teacher), student=DISTILL_STUDENT, data=str(data), out=str(out),
                              seed=demo.seed, threads=2, resume=True, **DISTILL))
        t = time.time() - t
    demo.checkpoints["distill"] = out / "model"
    res = _task_eval(demo, out / "model", f"student ({DISTILL_STUDENT})")
    ref = _task_eval(demo, teacher, "teacher (GRPO)")
    ts, tt = (count(ModelConfig.load(Path(d) / "config.json")) for d in (out / "model", teacher))
    print(f"student {human(ts.total)} parameters ({ts.total / tt.total:.2f}× the teacher's {human(tt.total)}, "
          f"all layers dense): {res['pass@1']:.1%} held-out vs the teacher's {ref['pass@1']:.1%} "
          f"({res['pass@1'] / max(ref['pass@1'], 1e-9):.0%} of it)")
    demo.record("distill", f"{_figure(res)}; teacher {ref['pass@1']:.1%}; {DISTILL_STUDENT} "
                           f"{human(ts.total)} parameters = {ts.total / tt.total:.2f}× the teacher's", t)


STAGES: list[tuple[str, Callable[[Demo], None]]] = [
    ("parity", stage_parity),
    ("tokenizer", stage_tokenizer),
    ("pretrain", stage_pretrain),
    ("sft", stage_sft),
    ("grpo", stage_grpo),
    ("distill", stage_distill),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanoseek.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of every stage (corpus, weights, data order, rollouts)")
    ap.add_argument("--root", default=None, help="run directory (default: runs/demo, or runs/demo-seedS for --seed S ≠ 0)")
    ap.add_argument("--fresh", action="store_true", help="delete the demo directory first")
    args = ap.parse_args(argv)
    root = Path(args.root or ("runs/demo" if args.seed == 0 else f"runs/demo-seed{args.seed}"))
    if args.fresh and root.exists():
        shutil.rmtree(root)
    demo = Demo(root=root, seed=args.seed)
    try:
        for _, run in STAGES:
            run(demo)
    except KeyboardInterrupt:
        print("\ninterrupted; run the demo again to continue where it stopped", file=sys.stderr)
        return 130
    banner("done")
    print(demo.write_summary().read_text())
    from .report import write_pipeline_report

    print(f"report card (every stage's figures, plots, MFU and cost): {write_pipeline_report(demo.root)}")
    if demo.latest is not None:
        print("serve it (OpenAI/DeepSeek-compatible API + chat page):")
        print(f"  nanoseek serve --ckpt {demo.latest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
