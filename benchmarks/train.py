"""Training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM, forward + backward,
side by side in one run.

    python benchmarks/train.py [--preset small] [--batch 16] [--seq-len 256] [--threads 1]

Both models hold the same weights (nanoseek's randomly initialised checkpoint, loaded by
transformers) on CPU, in train mode, and see the same batch. One timed iteration is
forward, next-token cross-entropy, backward (gradients zeroed between iterations, no optimizer
step, which is the same AdamW for both). nanoseek runs without its MTP head here because
transformers has none; a second nanoseek line shows the cost of the full V3 loss (MTP + balance).
Iterations alternate between the models so machine-load drift hits them alike, each on a fresh
batch (the same batches for every model); the best of `--reps` is reported. Every model runs
under torch.autocast(--dtype): bfloat16 by default (what `nanoseek pretrain --dtype bfloat16`
trains in), float32 for plain fp32. The vocabulary is the arithmetic tokenizer's (320 rows) unless --vocab is given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek.checkpoint import save_pretrained  # noqa: E402
from nanoseek.train.loop import autocast  # noqa: E402


def step_time(fn, params, amp: torch.dtype | None, x, y) -> float:
    t = time.perf_counter()
    with autocast(amp, torch.device("cpu")):
        loss = fn(x, y)
    loss.backward()
    dt = time.perf_counter() - t
    for p in params:
        p.grad = None
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="both models under torch.autocast of this dtype (default bfloat16; `nanoseek pretrain --dtype auto` is fp32 on CPU; docs/benchmarks.md has both)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = nanoseek.preset(args.preset, vocab_size=args.vocab)
    torch.manual_seed(0)
    ours = nanoseek.DeepSeekV3(cfg).train()
    # the main model alone (transformers has no MTP head): same weights, MTP module left out
    main = nanoseek.DeepSeekV3(cfg.replace(num_nextn_predict_layers=0)).train()
    main.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("mtp.")})
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_pretrained(ours, Path(d))
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    # a fresh batch per iteration (the same sequence of batches for every model): routing then
    # changes every step, as in training, so per-expert shapes do too
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
            for _ in range(args.reps + 1)]
    batches = [(s[:, :-1], s[:, 1:]) for s in seqs]

    def run_ours(x, y):
        return main(x, y, balance_alpha=0.0).loss

    def run_ours_full(x, y):
        return ours(x, y, mtp_weight=0.3, balance_alpha=1e-4).loss

    def run_theirs(x, y):
        logits = theirs(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    with torch.no_grad():  # the same function before timing it
        a = main(*batches[0]).lm_loss.item()
        b = run_theirs(*batches[0]).item()
    runs = {"nanoseek": (run_ours, list(main.parameters())),
            "transformers": (run_theirs, list(theirs.parameters())),
            "nanoseek (+MTP, balance)": (run_ours_full, list(ours.parameters()))}
    amp = torch.bfloat16 if args.dtype == "bfloat16" else None
    best = {k: float("inf") for k in runs}
    for name, (fn, ps) in runs.items():  # warm-up
        step_time(fn, ps, amp, *batches[0])
    for x, y in batches[1:]:
        for name, (fn, ps) in runs.items():
            best[name] = min(best[name], step_time(fn, ps, amp, x, y))
    tokens = args.batch * args.seq_len
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"$ python benchmarks/train.py --preset {args.preset} --batch {args.batch} --seq-len {args.seq_len} "
          f"--threads {args.threads} --dtype {args.dtype}")
    print(f"{args.preset}: {n_params / 1e6:.2f}M params (vocab {cfg.vocab_size}), batch {args.batch} x "
          f"{args.seq_len} = {tokens} tokens, {args.dtype}, {args.threads} thread(s); same loss: "
          f"{a:.5f} vs {b:.5f}")
    for name, t in best.items():
        print(f"  {name:26s} {tokens / t:9.1f} tok/s  ({t * 1000:.0f} ms / fwd+bwd)")
    print(f"speed-up nanoseek / transformers: {best['transformers'] / best['nanoseek']:.2f}x")


if __name__ == "__main__":
    main()
