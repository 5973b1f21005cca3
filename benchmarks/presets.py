"""Training throughput of each model-size preset on this CPU: what `nanoseek pretrain` does per
step (the full V3 loss with MTP and the balance term, backward, clipping, AdamW), timed in
process CPU seconds so that other jobs on a shared machine do not count.

    python benchmarks/presets.py [--presets small v3-15m v3-60m v3-250m] [--batch 4] [--seq-len 256]
                                 [--vocab 8192] [--reps 3] [--threads 1]

Presets are alternated (a, b, c, a, b, c, ...) after one warm-up step each, on fresh random
batches, and the best step of --reps is kept. Prints parameters (total, activated), tokens per
CPU-second and, from it, the tokens one core and two cores (at most twice one core) train in
15 minutes and the hours one core takes to 20 tokens per parameter.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.config import preset  # noqa: E402
from nanoseek.counting import count  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["small", "v3-15m", "v3-60m", "v3-250m"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models, opts = {}, {}
    for name in args.presets:
        models[name] = DeepSeekV3(preset(name, vocab_size=args.vocab)).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)

    def step(name: str) -> float:
        seq = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g)
        m, opt = models[name], opts[name]
        t = time.process_time()
        out = m(seq[:, :-1], seq[:, 1:], mtp_weight=0.3, balance_alpha=1e-4)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.process_time() - t

    for name in args.presets:
        step(name)
    best = {name: float("inf") for name in args.presets}
    for _ in range(args.reps):
        for name in args.presets:
            best[name] = min(best[name], step(name))
    tokens = args.batch * args.seq_len
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    print(f"$ python benchmarks/presets.py --presets {' '.join(args.presets)} --batch {args.batch} "
          f"--seq-len {args.seq_len} --vocab {args.vocab} --reps {args.reps} --threads {args.threads}")
    print(f"{cpu}; {args.threads} thread(s); batch {args.batch} x {args.seq_len} = {tokens} tokens; "
          f"vocab {args.vocab}; fp32; full V3 loss + AdamW")
    print(f"{'preset':10s} {'total':>8s} {'active':>8s} {'tok/CPU-s':>10s} {'15 min, 1 core':>15s} "
          f"{'15 min, 2 cores':>16s} {'20 tok/param, 1 core':>22s}")
    for name in args.presets:
        c = count(models[name].config)
        rate = tokens / best[name]
        print(f"{name:10s} {c.total / 1e6:7.1f}M {c.activated / 1e6:7.1f}M {rate:10.0f} {rate * 900 / 1e6:14.2f}M "
              f"{'≤ ' + format(2 * rate * 900 / 1e6, '.2f') + 'M':>16s} {20 * c.total / rate / 3600:20.1f} h")


if __name__ == "__main__":
    main()
