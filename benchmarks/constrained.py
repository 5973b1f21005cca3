"""What the allowed-token mask costs: decode throughput of the same sampled batch with no
constraint and under two grammars, side by side in one run.

    python benchmarks/constrained.py [--preset tiny] [--batch 32] [--new-tokens 128] [--reps 3] [--threads 1]

Every side generates exactly --new-tokens per request (temperature 1, seeded, ignore_eos), so the
batches stay full and only the mask differs: "string" is one JSON string that cannot end yet
(most tokens allowed: llguidance's mask over almost the whole vocabulary), "integers" a JSON array
of integers that cannot end yet (digits, commas and "-" only). The sides are alternated, each
keeps its best wall time of --reps after a warm-up, so a burst of load from other jobs hits all
alike. tokens/s counts generated tokens; the prompt is 8 tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.config import preset  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.engine.constraints import Grammar  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

CORPUS = ['{"name": "a b", "id": 12, "tags": ["x", "y"], "ok": true}', "the quick brown fox 123 456"] * 200


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = Tokenizer.train(CORPUS, vocab_size=1024)
    torch.manual_seed(0)
    model = DeepSeekV3(preset(args.preset, vocab_size=tok.vocab_size,
                              max_position_embeddings=max(256, args.new_tokens + 16)))
    engine = Engine(model, tok, max_num_seqs=args.batch)
    V = engine.config.vocab_size
    never_done = 10 * args.new_tokens
    sides = {
        "none": None,
        "string": Grammar.json_schema(tok, V, {"type": "string", "minLength": never_done}),
        "integers": Grammar.json_schema(tok, V, {"type": "array", "items": {"type": "integer"}, "minItems": never_done}),
    }
    prompts = [tok.encode("the quick brown fox 123 456 7")[:8]] * args.batch

    def run(g) -> float:
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.new_tokens, ignore_eos=True, constraint=g)
                  for i in range(args.batch)]
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        dt = time.perf_counter() - t0
        assert all(len(o.token_ids) == args.new_tokens for o in outs)
        return dt

    for g in sides.values():
        run(g)  # warm-up
    best = {name: float("inf") for name in sides}
    for _ in range(args.reps):
        for name, g in sides.items():
            best[name] = min(best[name], run(g))
    n = args.batch * args.new_tokens
    print(f"{args.preset} (random weights), vocab {V}, batch {args.batch} × {args.new_tokens} tokens, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    for name, t in best.items():
        print(f"{name:>9}: {n / t:8.1f} tok/s   ×{best['none'] / t:.2f} of unconstrained")


if __name__ == "__main__":
    main()
