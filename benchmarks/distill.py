"""Logit-distillation training throughput: `nanoseek distill --loss jsd` vs TRL's GKDTrainer
(lmbda = 0: every batch is the data, as for nanoseek's logit KD), side by side in one run.

    python benchmarks/distill.py --teacher runs/demo/grpo/model [--student dense-small --batch 16 --steps 4 --rounds 2]

Both sides distil the same teacher checkpoint into the same student (a `--student` preset built
with the teacher's tokenizer, initialised once and saved, so transformers loads the very same
weights), with the same generalized JSD (β = --beta, τ = 1), AdamW, and the same conversations:
each step takes the next --batch chats of --data. Both sides put one chat per row, padded to the
batch's longest (DataCollatorForChatML on TRL's side; `nanoseek distill`'s default, which then
runs the models' causal attention with no mask; `--pack` packs rows of --seq-len instead, with a
block-diagonal mask); nanoseek runs the teacher's and the student's heads on the answer tokens
only, TRL on every position. Reported: training tokens/s, counting the chats' real tokens
(prompt and answer, no padding) — the work both sides must do — and the step time. Rounds
alternate (nanoseek, TRL, nanoseek, TRL, …) so that load drift on a shared machine hits both
alike; each round's first step is a warm-up and is not timed.

TRL is needed for this benchmark only (`pip install trl`, a test dependency); without it the
nanoseek line is printed alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.checkpoint import load_pretrained, resolve_ckpt, save_pretrained  # noqa: E402
from nanoseek.config import ModelConfig, preset  # noqa: E402
from nanoseek.distill.train import kd_step_loss  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train.loop import Trainer, TrainConfig  # noqa: E402
from nanoseek.train.sft import load_conversations, pack, tokenize  # noqa: E402


def bench_nanoseek(teacher_dir: Path, student_dir: Path, tok: Tokenizer, convs, args) -> dict:
    teacher = load_pretrained(teacher_dir).requires_grad_(False)
    student = load_pretrained(student_dir)
    cfg = TrainConfig(out=tempfile.mkdtemp(prefix="ns-distill-"), max_steps=args.steps + 1, learning_rate=1e-4,
                      warmup_steps=0, schedule="constant", weight_decay=0.0, router_gamma=0.0, balance_alpha=0.0,
                      dtype=args.dtype, progress=False)
    trainer = Trainer(cfg, student, optimizer=torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate))
    loss_fn = kd_step_loss(teacher, args.beta, 1.0, teacher.config.vocab_size)
    times, tokens = [], 0
    for s in range(args.steps + 1):
        chats = convs[s * args.batch:(s + 1) * args.batch]
        ex = tokenize(chats, tok, args.seq_len)
        rows = pack(ex, args.seq_len, tok.pad_id, packed=args.pack)
        batch = tuple(torch.tensor([r[k] for r in rows]) for k in range(4))
        t = time.perf_counter()
        trainer.train_step([batch], loss_fn)
        if s:
            times.append(time.perf_counter() - t)
            tokens += sum(len(x) for x, _ in ex)
    return {"time": sum(times), "tokens": tokens, "steps": args.steps}


def bench_trl(teacher_dir: Path, student_dir: Path, tok: Tokenizer, convs, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    hf_tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    n = (args.steps + 1) * args.batch
    ds = Dataset.from_list([{"messages": c} for c in convs[:n]])
    stamps: list[float] = []
    seen: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    cfg = GKDConfig(output_dir=tempfile.mkdtemp(prefix="trl-gkd-"), per_device_train_batch_size=args.batch,
                    max_steps=args.steps + 1, lmbda=0.0, beta=args.beta, seq_kd=False, max_length=args.seq_len,
                    learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    use_cpu=True, bf16=args.dtype == "bfloat16", report_to="none", logging_steps=1,
                    save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=hf_tok,
                         callbacks=[Clock()])
    collate = trainer.data_collator

    def counted(examples):  # the real (unpadded) tokens of each batch TRL trains on
        out = collate(examples)
        seen.append(int(out["attention_mask"].sum()))
        return out

    trainer.data_collator = counted
    trainer.train()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"time": sum(gaps), "tokens": sum(seen[-len(gaps):]), "steps": len(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher checkpoint or run directory (e.g. runs/demo/grpo)")
    ap.add_argument("--student", default="dense-small", help="student preset")
    ap.add_argument("--data", default="builtin:sft-arith?n=1024&digits=3", help="chat jsonl (traces) or builtin set")
    ap.add_argument("--batch", type=int, default=16, help="chats per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row at most")
    ap.add_argument("--pack", action="store_true", help="nanoseek: pack chats into rows of --seq-len")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    teacher_dir = resolve_ckpt(args.teacher)
    tok = Tokenizer.load(teacher_dir)
    convs = load_conversations(args.data)
    if len(convs) < (args.steps + 1) * args.batch:
        raise SystemExit(f"--data has {len(convs)} chats; {(args.steps + 1) * args.batch} needed")
    student_dir = Path(tempfile.mkdtemp(prefix="student-")) / "student"
    torch.manual_seed(0)
    vocab = ModelConfig.load(teacher_dir / "config.json").vocab_size  # the teacher's, as `nanoseek distill` builds it
    save_pretrained(DeepSeekV3(preset(args.student, vocab_size=vocab)), student_dir,
                    extra={"tokenizer": tok.save})
    ns, trl = [], []
    for _ in range(args.rounds):
        ns.append(bench_nanoseek(teacher_dir, student_dir, tok, convs, args))
        try:
            trl.append(bench_trl(teacher_dir, student_dir, tok, convs, args))
        except ImportError as e:
            print(f"TRL not available ({e}); `pip install trl` to compare")
    print(f"\nlogit KD (generalized JSD β={args.beta}), teacher {args.teacher} → student {args.student}, "
          f"{args.batch} chats/step{f', packed into rows of {args.seq_len}' if args.pack else ''}, "
          f"{args.steps} timed steps × {args.rounds} rounds "
          f"(A/B/A/B), torch threads {torch.get_num_threads()}, {args.dtype}")

    def line(name, runs):
        t, tokens, steps = (sum(r[k] for r in runs) for k in ("time", "tokens", "steps"))
        per_round = ", ".join(f"{r['tokens'] / r['time']:.0f}" for r in runs)
        print(f"  {name:9s}: {tokens / t:.0f} training tokens/s ({t / steps:.2f} s/step; per round {per_round})")
        return tokens / t

    a = line("nanoseek", ns)
    if trl:
        b = line("TRL", trl)
        print(f"  ratio    : {a / b:.2f}x")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
