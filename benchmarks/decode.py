"""Decode throughput: nanoseek's engine, with and without MTP speculation, vs transformers'
`generate`, side by side in one run.

    python benchmarks/decode.py [--preset small] [--new-tokens 64] [--threads N]
    python benchmarks/decode.py --ckpt runs/demo/mtp --task arithmetic --task-args '{"digits": 3, "min_digits": 3}' \\
        --speculative-tokens 2 --new-tokens 128 [--transformers false]

With a preset, all load the same randomly initialised checkpoint (fp32 on CPU) and produce a
fixed number of new tokens (ignore_eos / min_new_tokens) after random prompts. With `--ckpt`, a
trained checkpoint answers held-out chat prompts of `--task` and stops at its end-of-sequence
token (at most --new-tokens): greedy decoding writes the same tokens on every side, so they are
timed on the same work. Greedy, at batch 1 (8 prompts, one after another) and at `--batch`
prompts together; output tokens/s counts only generated tokens, and time includes prefill for
all. `--speculative-tokens k` adds the engine drafting k tokens a step with the MTP module(s),
with the share of drafts kept at each position. The sides are alternated (best CPU time of
--reps after a warm-up each), so a burst of load from other jobs hits all alike. It also prints
the latent cache's bytes per token (read from the engine's allocation) against an expanded MHA
cache of the same model, and batch-1 decode as a fraction of the memory-bandwidth roofline:
(bytes of weights one token activates) ÷ (measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek.checkpoint import resolve_ckpt, save_pretrained  # noqa: E402
from nanoseek.counting import count  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402


def copy_bandwidth(mb: int = 256, reps: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write), the memory roofline's denominator."""
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def timed(fns: dict, reps: int = 3) -> dict:
    """Best-of-`reps` CPU seconds of each function (the process's own time: a job that waits for
    a core shared with others is not charged for the wait), alternated (a, b, c, a, b, c, ...) so
    that a burst of load from other jobs hits all alike; one warm-up call each."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t)
    return best


def prompts_for(args, cfg, tok, n: int, length: int | None = None) -> list[list[int]]:
    """n prompts: held-out chat prompts of the task (--ckpt), or random token ids (`length`
    long, or 8-128)."""
    if args.ckpt:
        from nanoseek.tasks import get_task
        from nanoseek.train.grpo import build_prompt

        task = get_task(args.task, **json.loads(args.task_args))
        return [build_prompt(p, tok, "chat") for p in task.make(n, 1234, split="test")]
    rng = random.Random(0)
    return [[rng.randrange(8, cfg.vocab_size) for _ in range(length or rng.randint(8, 128))] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--ckpt", default=None, help="a trained checkpoint (or run directory) instead of a random preset")
    ap.add_argument("--task", default="arithmetic", help="with --ckpt: whose held-out prompts it answers")
    ap.add_argument("--task-args", default="{}", help="with --ckpt: the task's knobs as JSON")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--speculative-tokens", type=int, default=0, help="also time the engine drafting k tokens a step")
    ap.add_argument("--transformers", default="true", choices=["true", "false"], help="also time transformers")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each (best kept), alternated")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    k, N = args.speculative_tokens, args.new_tokens
    if args.ckpt:
        tmp = resolve_ckpt(args.ckpt)
        model = nanoseek.load_model(tmp).float().eval()
        tok = Tokenizer.load(tmp)
        what = f"checkpoint {args.ckpt}, {args.task} {args.task_args} held-out chat prompts, to the end of sequence"
    else:
        model = nanoseek.load_model(args.preset, seed=0).float().eval()
        tok = None
        tmp = Path(tempfile.mkdtemp()) / "ckpt"
        save_pretrained(model, tmp)
        what = f"model {args.preset} (random weights), random prompts, {N} tokens each"
    cfg = model.config
    sides = {"nanoseek": 0} | ({f"nanoseek + {k} MTP drafts": k} if k else {})
    engines = {name: Engine(model, tok, device="cpu", dtype=torch.float32, max_num_seqs=args.batch,
                            enable_prefix_cache=False, speculative_tokens=s) for name, s in sides.items()}
    hf = None
    if args.transformers == "true":
        import transformers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    # batch 1: 8 prompts, each alone; batch B: B prompts at once
    batches = {1: [[p] for p in prompts_for(args, cfg, tok, 8, 32)],
               args.batch: [prompts_for(args, cfg, tok, args.batch)]}
    print(f"$ python benchmarks/decode.py {' '.join(sys.argv[1:])}")
    print(f"{what}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", transformers {transformers.__version__}" if hf is not None else ""))
    sp = SamplingParams(max_tokens=N, temperature=0, ignore_eos=not args.ckpt)

    results = {}
    for B, groups in batches.items():
        made: dict[str, list] = {}
        fns = {}
        for name, eng in engines.items():
            def run(eng=eng, name=name):
                made[name] = [o.token_ids for prompts in groups for o in eng.generate(prompts, sp)]
            fns[name] = run

        if hf is not None:
            def theirs():
                made["transformers"] = []
                for prompts in groups:
                    L = max(map(len, prompts))
                    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])  # left padding
                    att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
                    kw = dict(eos_token_id=tok.eos_id) if args.ckpt else dict(min_new_tokens=N)
                    with torch.inference_mode():
                        out = hf.generate(ids, attention_mask=att, max_new_tokens=N, do_sample=False, pad_token_id=2,
                                          **kw)
                    made["transformers"] += [row[L:].tolist() for row in out]
            fns["transformers"] = theirs

        for eng in engines.values():  # acceptance over the timed runs only
            eng.spec_steps, eng.spec_drafted, eng.spec_accepted = 0, [0] * k, [0] * k
        best = timed(fns, args.reps)
        tokens = sum(map(len, made["nanoseek"]))
        for name in engines:
            assert made[name] == made["nanoseek"], f"{name} wrote other tokens"
        label = f"batch {B:>3} ({'8 prompts, one at a time' if B == 1 else f'{B} prompts'})"
        parts = []
        for name, t in best.items():
            parts.append(f"{name} {tokens / t:8.1f} tok/s" if name != "transformers" else
                         f"transformers {sum(len([x for x in row if x != 2]) for row in made[name]) / t:8.1f} tok/s")
        print(f"{label}: " + " | ".join(parts))
        base = best["nanoseek"]
        results[B] = tokens / base
        for name, eng in engines.items():
            if eng.speculative_tokens:
                st = eng.stats
                acc = " ".join(f"{a / d:.1%}" for a, d in zip(st["spec_num_accepted_tokens_per_pos"],
                                                              st["spec_num_draft_tokens_per_pos"]))
                print(f"    {name}: x{base / best[name]:.2f} of nanoseek; drafts kept by position {acc}, "
                      f"mean accepted length {st['spec_mean_accepted_length']:.2f}")
        if hf is not None:
            print(f"    nanoseek x{best['transformers'] / base:.2f} of transformers")

    # roofline: every activated weight read once per token at batch 1
    c = count(cfg, dtype="float32")
    act_bytes = c.activated * 4
    bw = copy_bandwidth()
    roof = bw / act_bytes
    print(f"roofline: {c.activated / 1e6:.2f}M activated params x 4 B = {act_bytes / 1e6:.2f} MB/token; copy bandwidth "
          f"{bw / 1e9:.1f} GB/s → {roof:.0f} tok/s; batch-1 decode reaches {results[1] / roof:.1%} of it")
    mha = c.mha_cache_bytes
    bpt = engines["nanoseek"].bytes_per_token
    assert bpt == c.mla_cache_bytes, (bpt, c.mla_cache_bytes)
    print(f"KV cache: {bpt} B/token (latent, read from the allocation) vs {mha} B/token expanded MHA → "
          f"{mha / bpt:.1f}x smaller")


if __name__ == "__main__":
    main()
