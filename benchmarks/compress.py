"""Decode speed of int8 / int4 checkpoints against fp32, side by side in one run.

    python benchmarks/compress.py                       # a random model far larger than the CPU's caches
    python benchmarks/compress.py --ckpt runs/demo/grpo  # a trained checkpoint (the demo reasoner)
    python benchmarks/compress.py --kernels             # the candidate CPU kernels on one matrix

Batch-1 decode reads every weight a token activates once per token, so on a CPU it is bound by
memory bandwidth once the weights are well past the last-level cache: int8 weights are a quarter
of the bytes. The random model (default --hidden 1024, 6 layers, 8 routed experts of width 1024,
2 active + 1 shared) is saved as a checkpoint, compressed with `nanoseek compress --method int8`
(and int4), and each directory is loaded into the engine as `nanoseek generate` loads it; all
engines decode the same fixed prompts greedily (a fixed number of new tokens, ignore_eos),
alternated (a, b, c, a, b, c, ...; best process CPU time of --reps after a warm-up each) so a burst
of load from other jobs hits all alike. Prints the CPU, its last-level cache, the bytes of
weights one token reads, tokens/s of each at batch 1 and at --batch, and the ratios to fp32.
`--kernels` times the candidate kernels for one 8192×2048 matrix instead — the fp32 matmul,
torch's weight-only int8 (fp32 and bf16 activations), fbgemm's int8 with dynamic activations
and torch's int4 (bf16 activations) — the figures behind the engine's choice of kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import timed  # noqa: E402

from nanoseek.checkpoint import resolve_ckpt, save_pretrained  # noqa: E402
from nanoseek.compress import CompressConfig, compress  # noqa: E402
from nanoseek.compress.save import weight_bytes  # noqa: E402
from nanoseek.compress.sweep import cpu_model  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402


def last_level_cache() -> str:
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
    if not caches:
        return "unknown"
    c = caches[-1]
    return f"L{(c / 'level').read_text().strip()} {(c / 'size').read_text().strip()}"


def active_bytes(engine) -> int:
    """Bytes of the weights one decoded token reads: attention, dense FFNs, k routed experts + the
    shared ones per MoE layer, the head (from the fp32 model; int8 reads a quarter of the matrices)."""
    m, c = engine.model, engine.config
    n = m.lm_head.weight.numel() + c.hidden_size
    for layer in m.layers:
        n += sum(p.numel() for p in layer.self_attn.parameters())
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            n += mlp.gate.weight.numel() + sum(p.numel() for p in mlp.shared_experts.parameters())
            n += c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size
        else:
            n += sum(p.numel() for p in mlp.parameters())
    return 4 * n


def kernels(reps: int = 20) -> dict:
    """ms per call of each candidate kernel for x (B, 2048) · W (8192, 2048)ᵀ, B = 1 and 32."""
    from nanoseek.compress.kernels import PackedLinear
    from nanoseek.compress.quant import quantize

    torch.manual_seed(0)
    w = torch.randn(8192, 2048)
    wt = w.t().contiguous()
    q, s = quantize(w, 8, None)
    p8, p4 = PackedLinear(w, 8), PackedLinear(w, 4, 128)
    out = {}
    for B in (1, 32):
        x = torch.randn(B, 2048)
        xb = x.bfloat16()
        fns = {"fp32 mm": lambda: torch.mm(x, wt),
               "int8 weight-only (fp32 x)": lambda: torch.ops.aten._weight_int8pack_mm(x, q, s[:, 0]),
               "int8 weight-only (bf16 x)": lambda: torch.ops.aten._weight_int8pack_mm(xb, q, s[:, 0].bfloat16()),
               "int8 fbgemm dynamic": lambda: p8.mm(x), "int4 weight-only (bf16 x)": lambda: p4.mm(x)}
        best = timed({k: (lambda f=f: [f() for _ in range(reps)]) for k, f in fns.items()}, 3)
        out[f"batch {B}"] = {k: f"{1e3 * t / reps:.2f} ms" for k, t in best.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=None, help="a trained checkpoint (or run directory) instead of a random model")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--methods", default="int8,int4", help="compressed variants to time beside fp32")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kernels", action="store_true", help="time the candidate kernels on one matrix instead")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    if args.kernels:
        print(json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(), **kernels()}, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.ckpt:
            src = resolve_ckpt(args.ckpt)
        else:
            H = args.hidden
            cfg = preset("small", hidden_size=H, intermediate_size=4 * H, moe_intermediate_size=H,
                         num_hidden_layers=args.layers, first_k_dense_replace=1, num_attention_heads=8,
                         q_lora_rank=H // 2, kv_lora_rank=H // 4, qk_nope_head_dim=64, qk_rope_head_dim=32,
                         v_head_dim=64, vocab_size=4096, num_nextn_predict_layers=0)
            torch.manual_seed(0)
            src = save_pretrained(DeepSeekV3(cfg), Path(tmp) / "fp32")
        dirs = {"fp32": src}
        for method in args.methods.split(","):
            d = Path(tmp) / method
            compress(CompressConfig(ckpt=str(src), method=method, out=str(d), group_size=args.group_size))
            dirs[method] = d
        engines = {name: Engine(d, device="cpu") for name, d in dirs.items()}
        V = engines["fp32"].config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(8, V, (16,), generator=g).tolist() for _ in range(args.batch)]
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        res = {"cpu": cpu_model(), "last_level_cache": last_level_cache(), "threads": torch.get_num_threads(),
               "fp32_bytes_per_token": active_bytes(engines["fp32"]),
               **{f"{name}_checkpoint_bytes": weight_bytes(d) for name, d in dirs.items()}}
        for B in (1, args.batch):
            best = timed({name: (lambda e=e: e.generate(prompts[:B], params)) for name, e in engines.items()},
                         args.reps)
            for name, t in best.items():
                res[f"{name}_tok_s_b{B}"] = round(B * args.new_tokens / t, 1)
            for name in engines:
                if name != "fp32":
                    res[f"{name}_speedup_b{B}"] = round(best["fp32"] / best[name], 2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
