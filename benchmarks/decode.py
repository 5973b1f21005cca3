"""Decode throughput: nanoseek's engine vs transformers' `generate`, side by side in one run.

    python benchmarks/decode.py [--preset small] [--new-tokens 64] [--threads N]

Both load the same randomly initialised checkpoint (fp32 on CPU) and produce a fixed number of
new tokens (ignore_eos / min_new_tokens), greedily, at batch 1 and at 32 mixed-length prompts.
Output tokens/s counts only generated tokens; time includes prefill for both. It also prints
the latent cache's bytes per token (read from the engine's allocation) against an expanded MHA
cache of the same model, and batch-1 decode as a fraction of the memory-bandwidth roofline:
(bytes of weights one token activates) ÷ (measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek.checkpoint import save_pretrained  # noqa: E402
from nanoseek.counting import count  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402


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


def timed_pair(a, b, reps: int = 3) -> tuple[float, float]:
    """Best-of-`reps` seconds of a and of b, alternated (a, b, a, b, ...) so that a burst of load
    from other jobs on a shared machine hits both alike; one warm-up call each."""
    a(), b()
    best = [float("inf")] * 2
    for _ in range(reps):
        for i, fn in enumerate((a, b)):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each (best kept), alternated")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    model = nanoseek.load_model(args.preset, seed=0).float().eval()
    cfg = model.config
    tmp = Path(tempfile.mkdtemp()) / "ckpt"
    save_pretrained(model, tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    eng = Engine(str(tmp), device="cpu", dtype=torch.float32, max_num_seqs=args.batch, enable_prefix_cache=False)
    N = args.new_tokens
    rng = random.Random(0)
    batches = {1: [[rng.randrange(8, cfg.vocab_size) for _ in range(32)]],
               args.batch: [[rng.randrange(8, cfg.vocab_size) for _ in range(rng.randint(8, 128))]
                            for _ in range(args.batch)]}
    print(f"$ python benchmarks/decode.py --preset {args.preset} --new-tokens {N} --batch {args.batch}"
          f"{f' --threads {args.threads}' if args.threads else ''}")
    print(f"model {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")

    results = {}
    for B, prompts in batches.items():
        def ours():
            outs = eng.generate(prompts, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True))
            assert all(len(o.token_ids) == N for o in outs)

        def theirs():
            L = max(map(len, prompts))
            ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])  # left padding
            att = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=att, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                  pad_token_id=2)
            assert out.shape[1] == L + N

        t_ours, t_hf = timed_pair(ours, theirs, args.reps)
        results[B] = (B * N / t_ours, B * N / t_hf)
        print(f"batch {B:>3} ({'prompt 32' if B == 1 else 'prompts 8-128'}): nanoseek {B * N / t_ours:8.1f} tok/s | "
              f"transformers {B * N / t_hf:8.1f} tok/s | speed-up {t_hf / t_ours:5.2f}x")

    # roofline: every activated weight read once per token at batch 1
    c = count(cfg, dtype="float32")
    act_bytes = c.activated * 4
    bw = copy_bandwidth()
    roof = bw / act_bytes
    print(f"roofline: {c.activated / 1e6:.2f}M activated params x 4 B = {act_bytes / 1e6:.2f} MB/token; copy bandwidth "
          f"{bw / 1e9:.1f} GB/s → {roof:.0f} tok/s; batch-1 decode reaches {results[1][0] / roof:.1%} of it")
    mha = c.mha_cache_bytes
    bpt = eng.bytes_per_token
    assert bpt == c.mla_cache_bytes, (bpt, c.mla_cache_bytes)
    print(f"KV cache: {bpt} B/token (latent, read from the allocation) vs {mha} B/token expanded MHA → "
          f"{mha / bpt:.1f}x smaller")


if __name__ == "__main__":
    main()
