"""GRPO step throughput (rollout + update, completions/s): nanoseek vs TRL's GRPOTrainer.

Both sides start from the same exported checkpoint directory (nanoseek writes HF deepseek_v3
directories; transformers loads it as DeepseekV3ForCausalLM), train on the same prompts with
the same G, max_completion_length, temperature, loss (dapo, beta 0, group scaling, one update
per generation) and the same rule reward, and are timed side by side in one process, in
alternating rounds (nanoseek, TRL, nanoseek, TRL, …) so that load drift on a shared machine hits
both alike. Each round starts from the checkpoint; its first step is a warm-up and is not
timed. Reported: completions/s over all timed steps, and the step split into rollout (generation
+ reward; TRL: `_generate_and_score_completions`) and update.

    python benchmarks/grpo.py --ckpt runs/demo/sft/model [--steps 3 --prompts 8 --G 8 --len 64 --rounds 2]
    python benchmarks/grpo.py --ckpt runs/demo/sft/model --speculative-tokens 2 --trl false

TRL is needed for the comparison only (`pip install trl`); it generates with transformers'
`generate` (no vLLM on CPU), nanoseek with its paged latent-cache engine. `--speculative-tokens k`
adds nanoseek rolling out with k MTP drafts a step (`nanoseek grpo --speculative-tokens k`) to
the alternation, with the share of drafts kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.tasks import get_task  # noqa: E402
from nanoseek.tasks.rewards import load_reward, weighted  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train.grpo import EngineSampler, GRPOConfig, build_prompt, grpo_update, reward_kwargs, score  # noqa: E402
from nanoseek.train.loop import Trainer  # noqa: E402
from nanoseek.checkpoint import resolve_ckpt  # noqa: E402

# `nanoseek grpo`'s own reward (accuracy + format, weight 1 each, chat template), for both sides
REWARD = weighted({name: (load_reward(name), 1.0) for name in ("accuracy", "format")})
REWARD_KW = reward_kwargs("chat")


def problems_for(args):
    task = get_task("arithmetic", **json.loads(args.task_args))
    return task.make(args.prompts * (args.steps + 1), seed=7, split="train")


def bench_nanoseek(ckpt: Path, tok: Tokenizer, args, probs, k: int = 0) -> dict:
    from nanoseek.checkpoint import load_pretrained

    model = load_pretrained(ckpt)
    cfg = GRPOConfig(ckpt=str(ckpt), task="arithmetic", out="-", num_generations=args.G,
                     max_completion_length=args.len, temperature=1.0, learning_rate=1e-6,
                     loss_type="dapo", beta=0.0, scale_rewards="group", dynamic_sampling=False,
                     mask_truncated_completions=False, prompts_per_step=args.prompts, gradient_accumulation_steps=1,
                     dtype=args.dtype)  # the whole batch in one forward
    # torch's AdamW defaults, as TRL's: the same optimizer on both sides
    trainer = Trainer(cfg, model, optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate))
    sampler = EngineSampler(model, tok, args.prompts * args.G, args.len + 128, speculative_tokens=k)
    times, t_roll, n_tok = [], 0.0, 0
    for s in range(args.steps + 1):
        batch = [p for p in probs[s * args.prompts:(s + 1) * args.prompts] for _ in range(args.G)]
        t0 = time.perf_counter()
        rolls = sampler.generate([build_prompt(p, tok, "chat") for p in batch], args.len, 1.0, seed=s)
        r, _, _ = score(rolls, batch, tok, REWARD, REWARD_KW)
        t1 = time.perf_counter()
        grpo_update(trainer, None, rolls, r, cfg, tok.pad_id)
        if s:
            times.append(time.perf_counter() - t0)
            t_roll += t1 - t0
            n_tok += sum(len(x.ids) for x in rolls)
    n = args.steps * args.prompts * args.G
    return {"n": n, "time": sum(times), "rollout_time": t_roll, "tokens": n_tok, "stats": sampler.engine.stats}


def bench_trl(ckpt: Path, tok: Tokenizer, args, probs) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    hf_tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_id
    model.generation_config.pad_token_id = tok.pad_id
    model.generation_config.bos_token_id = tok.bos_id
    rows = [{"prompt": tok.render_chat_text([{"role": "user", "content": p.prompt}], add_generation_prompt=True),
             "idx": i} for i, p in enumerate(probs)]
    # G copies of each prompt are made by TRL; the sampler visits prompts in dataset order
    ds = Dataset.from_list(rows)

    def trl_reward(prompts, completions, idx, completion_ids=None, **kw):
        # TRL decodes without special tokens (<think> would vanish); score the same text as
        # nanoseek does, from the ids, when TRL hands them over
        texts = [tok.decode(c) for c in completion_ids] if completion_ids is not None else completions
        return REWARD(texts, [probs[i] for i in idx], **REWARD_KW)[0]

    stamps: list[float] = []
    gen_times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    out = tempfile.mkdtemp(prefix="trl-grpo-")
    cfg = TRLConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.G,
                     num_generations=args.G, max_completion_length=args.len, temperature=1.0,
                     top_k=0, learning_rate=1e-6, beta=0.0, loss_type="dapo", scale_rewards="group",
                     num_iterations=1, max_steps=args.steps + 1, use_cpu=True, bf16=args.dtype == "bfloat16",
                     report_to="none", logging_steps=1, save_strategy="no", shuffle_dataset=False,
                     disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=cfg, train_dataset=ds,
                          processing_class=hf_tok, callbacks=[Clock()])
    gen_and_score = trainer._generate_and_score_completions

    def timed(*a, **k):  # timing only: TRL's rollout + reward (+ old log-probs when it needs them)
        t = time.perf_counter()
        out = gen_and_score(*a, **k)
        gen_times.append(time.perf_counter() - t)
        return out

    trainer._generate_and_score_completions = timed
    trainer.train()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    n = args.steps * args.prompts * args.G
    hist = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"n": n, "time": sum(gaps), "rollout_time": sum(gen_times[-len(gaps):]),
            "tokens": sum(float(h["completions/mean_length"]) for h in hist[1:]) * args.prompts * args.G,
            "reward": float(hist[-1]["reward"]) if hist else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--len", type=int, default=64)
    ap.add_argument("--task-args", default='{"digits": 3}')
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the update's precision on both sides (TRL: bf16=True/False); default float32, what `nanoseek grpo` uses on CPU")
    ap.add_argument("--rounds", type=int, default=2,
                    help="nanoseek, TRL, nanoseek, TRL, … (A/B/A/B, so load drift hits both alike)")
    ap.add_argument("--speculative-tokens", type=int, default=0, help="also time nanoseek rolling out with k MTP drafts")
    ap.add_argument("--trl", default="true", choices=["true", "false"], help="also time TRL")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ckpt = resolve_ckpt(args.ckpt)
    tok = Tokenizer.load(ckpt)
    probs = problems_for(args)
    ns_runs, spec_runs, trl_runs = [], [], []
    for _ in range(args.rounds):
        ns_runs.append(bench_nanoseek(ckpt, tok, args, probs))
        if args.speculative_tokens:
            spec_runs.append(bench_nanoseek(ckpt, tok, args, probs, args.speculative_tokens))
        if args.trl == "true":
            try:
                trl_runs.append(bench_trl(ckpt, tok, args, probs))
            except ImportError as e:
                print(f"TRL not available ({e}); `pip install trl` to compare")
    print(f"\nGRPO step throughput, {args.prompts} prompts x G={args.G}, max_completion_length={args.len}, "
          f"{args.steps} timed steps x {args.rounds} rounds (A/B/A/B), torch threads {torch.get_num_threads()}, "
          f"update in {args.dtype}")

    def line(name, runs, extra=""):
        n, t, roll = sum(r["n"] for r in runs), sum(r["time"] for r in runs), sum(r["rollout_time"] for r in runs)
        steps = args.steps * len(runs)
        per_round = ", ".join(f"{r['n'] / r['time']:.1f}" for r in runs)
        print(f"  {name:9s}: {n / t:.2f} completions/s ({t / steps:.2f} s/step: rollout {roll / steps:.2f} + "
              f"update {(t - roll) / steps:.2f}; mean completion {sum(r['tokens'] for r in runs) / n:.0f} tokens"
              f"{extra}; per round {per_round})")
        return n / t

    a = line("nanoseek", ns_runs)
    if spec_runs:
        k = args.speculative_tokens
        line(f"+{k} MTP", spec_runs)
        st = spec_runs[-1]["stats"]
        kept = " ".join(f"{x / d:.1%}" for x, d in zip(st["spec_num_accepted_tokens_per_pos"],
                                                     st["spec_num_draft_tokens_per_pos"]))
        roll = sum(r["rollout_time"] for r in ns_runs) / sum(r["rollout_time"] for r in spec_runs)
        print(f"  rollout  : x{roll:.2f} with {k} MTP drafts (drafts kept by position {kept}, mean accepted length "
              f"{st['spec_mean_accepted_length']:.2f}, last round)")
    if trl_runs:
        b = line("TRL", trl_runs, f", reward {trl_runs[-1]['reward']:.2f}")
        print(f"  ratio    : {a / b:.2f}x")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
