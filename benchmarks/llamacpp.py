"""llama.cpp runs nanoseek's GGUF export: the same greedy tokens as nanoseek's engine in f32, and
both engines' batch-1 decode speed side by side in one run.

    python benchmarks/llamacpp.py --ckpt runs/demo/grpo --task arithmetic \\
        --task-args '{"digits": 3, "min_digits": 3}' [--types f32 q8_0] [--work /tmp/llamacpp]
    python benchmarks/llamacpp.py --preset v3-60m --tokenizer runs/demo/tokenizer --new-tokens 64
    python benchmarks/llamacpp.py --preset v3-15m --tokenizer runs/demo/tokenizer --set q_lora_rank=null

llama.cpp is built from the source that ships inside the `llama-cpp-python` source package
(`pip download --no-binary :all: --no-deps llama-cpp-python`: its vendor/llama.cpp, built with
cmake as a shared library, under `nice`; several minutes on two cores, once — `--work` keeps it)
and driven through that package's own ctypes bindings (its low-level `llama_cpp.llama_cpp`
module only). The checkpoint is converted with `nanoseek export --format gguf`'s writer.

With `--ckpt`, both sides answer the same held-out chat prompts of `--task`, one at a time,
greedily, to the end-of-sequence token (at most --new-tokens): the tokens must be equal in f32
(q8_0's are counted, not required). With `--preset` (and `--set` overrides), a randomly
initialised model writes a fixed --new-tokens after random prompts; at a size past the
last-level cache batch-1 decode is memory-bound; the tokens are counted, as random weights leave
near-ties. Before that, the next-token logits after each prompt are compared: llama.cpp runs with
an f32 latent cache and without flash attention, so f32 is f32 on both sides. The tokenizer is
checked too: llama.cpp's tokenization (its pre-type `starcoder`) of a set of texts equals
nanoseek's. Speed: generated tokens ÷ the process's CPU seconds (prefill included), best of
--reps after a warm-up, the sides alternated, every side on --threads threads; the f32 file runs
twice, in that exact context and in llama.cpp's own defaults (f16 latent cache, flash
attention), which is how it is usually run.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nanoseek  # noqa: E402
from decode import prompts_for, timed  # noqa: E402
from nanoseek.checkpoint import resolve_ckpt  # noqa: E402
from nanoseek.config import preset_with  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.export.gguf import model_name, write_gguf  # noqa: E402
from nanoseek.model import DeepSeekV3  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

DEFAULTS = "f32, f16 cache + flash attention"  # llama.cpp's own context defaults
TEXTS = ["Q: 123+456\nA:", "What is 9071 + 38?", "  leading spaces, trailing  \n\n", "it's 2026: x=3.14159",
         "naïve café ünïcode — ½ ² ٣", "tabs\tand\r\nnewlines", "<|user|> typed as text"]


def source(work: Path) -> Path:
    """vendor/llama.cpp inside the llama-cpp-python sdist (downloaded and unpacked once)."""
    found = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    "llama-cpp-python", "-d", str(work)], check=True)
    sdist = sorted(work.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(sdist) as t:
        t.extractall(work, filter="data")
    return sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def build(src: Path, work: Path) -> Path:
    """libllama.so (and ggml's) built from `src`, once; returns the directory holding them."""
    out = work / "build"
    lib = out / "bin"
    if not (lib / "libllama.so").exists():
        nice = ["nice", "-n", "10"]
        subprocess.run([*nice, "cmake", "-S", str(src), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
                        "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"], check=True)
        subprocess.run([*nice, "cmake", "--build", str(out), "-j", str(os.cpu_count() or 1), "--target", "llama"],
                       check=True)
    return lib


def bindings(src: Path, lib: Path):
    """llama-cpp-python's low-level ctypes module, loading the libraries in `lib`. The package's
    __init__ (its high-level API and server) needs more dependencies than the bindings do, so the
    package is entered without it."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib)
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [str(src.parents[1] / "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


class Llama:
    """One llama.cpp model + context: tokenize, and greedy decoding from token ids."""

    def __init__(self, C, path: Path, n_ctx: int, threads: int, exact: bool = True):
        self.C = C
        mp = C.llama_model_default_params()
        self.model = C.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = C.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        if exact:  # f32 end to end, as the engine runs: llama.cpp's defaults keep the latent cache
            # in f16 and its CPU flash attention rounds through f16 (1e-3 relative in the logits)
            cp.type_k = cp.type_v = C.GGML_TYPE_F32
            cp.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = C.llama_init_from_model(self.model, cp)
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.C.llama_token * (len(raw) + 8))()
        n = self.C.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, False)
        return list(buf[:n])

    def _decode(self, ids: list[int]) -> np.ndarray:
        arr = (self.C.llama_token * len(ids))(*ids)
        if self.C.llama_decode(self.ctx, self.C.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        return np.ctypeslib.as_array(self.C.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))

    def last_logits(self, prompt: list[int]) -> np.ndarray:
        self.C.llama_memory_clear(self.C.llama_get_memory(self.ctx), True)
        return self._decode(prompt).copy()

    def greedy(self, prompt: list[int], max_new: int, eos: int) -> list[int]:
        out: list[int] = []
        logits = self.last_logits(prompt)
        while len(out) < max_new:
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt == eos:
                break
            logits = self._decode([nxt])
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", help="a trained checkpoint (or run directory) with its tokenizer")
    ap.add_argument("--preset", help="instead of --ckpt: a randomly initialised model of this preset")
    ap.add_argument("--tokenizer", help="with --preset: the tokenizer directory the GGUF carries")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="with --preset: a model config override (as every command's --set), repeatable")
    ap.add_argument("--task", default="arithmetic", help="with --ckpt: whose held-out chat prompts both answer")
    ap.add_argument("--task-args", default="{}", help="with --ckpt: the task's knobs as JSON")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--types", nargs="+", default=["f32", "q8_0"], choices=["f32", "q8_0"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "nanoseek-llamacpp"),
                    help="where the llama.cpp source and build are kept between runs")
    args = ap.parse_args()
    if bool(args.ckpt) == bool(args.preset) or bool(args.preset) != bool(args.tokenizer):
        ap.error("give --ckpt, or --preset with --tokenizer")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    src = source(work)
    C = bindings(src, build(src, work))
    quiet = C.llama_log_callback(lambda level, text, data: None)  # kept referenced: llama.cpp calls it
    C.llama_log_set(quiet, ctypes.c_void_p())
    C.llama_backend_init()

    if args.ckpt:
        tok_dir = resolve_ckpt(args.ckpt)
        model = nanoseek.load_model(tok_dir).float().eval()
        tok = Tokenizer.load(tok_dir)
        name = model_name(tok_dir)
        what = (f"checkpoint {args.ckpt}: {args.prompts} held-out {args.task} {args.task_args} chat prompts, one at "
                f"a time, greedy to end of sequence (at most {args.new_tokens})")
    else:
        tok_dir, tok = Path(args.tokenizer), Tokenizer.load(args.tokenizer)
        torch.manual_seed(0)
        model = DeepSeekV3(preset_with(args.preset, args.set)).eval()
        name = args.preset
        sets = "".join(f" --set {x}" for x in args.set)
        what = (f"model {args.preset}{sets} (random weights): {args.prompts} random 32-token prompts, one at a "
                f"time, greedy, {args.new_tokens} tokens each")
    cfg = model.config
    ns = argparse.Namespace(ckpt=args.ckpt, task=args.task, task_args=args.task_args)
    prompts = prompts_for(ns, cfg, tok, args.prompts, 32)
    n_ctx = max(map(len, prompts)) + args.new_tokens + 8
    # a random model's ids reach past the tokenizer's: the engine then runs without one
    engine = Engine(model, tok if args.ckpt else None, device="cpu", dtype=torch.float32, max_num_seqs=1,
                    enable_prefix_cache=False)
    sp = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=not args.ckpt)
    eos = tok.eos_id if args.ckpt else None
    llamas = {}
    for t in args.types:
        path = write_gguf(model, tok_dir, work / f"{name}-{t}.gguf", t)
        llamas[t] = Llama(C, path, n_ctx, args.threads)
        if t == "f32":  # and as llama.cpp runs it by default
            llamas[DEFAULTS] = Llama(C, path, n_ctx, args.threads, exact=False)
    version = src.parents[1].name.removeprefix("llama_cpp_python-")
    print(f"$ python benchmarks/llamacpp.py {' '.join(sys.argv[1:])}")
    print(f"{what}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; {args.threads} thread(s); "
          f"llama.cpp from llama-cpp-python {version}, torch {torch.__version__}")

    for t, llama in llamas.items():
        if t == DEFAULTS:
            continue
        same = [llama.tokenize(x) == tok.encode(x, allow_special=False) for x in TEXTS]
        print(f"tokenizer ({t} GGUF, pre-type starcoder): llama.cpp's ids equal nanoseek's on {sum(same)}/{len(same)} "
              "texts")
        assert all(same), [x for x, s in zip(TEXTS, same) if not s]

    with torch.no_grad():
        ours_last = [model(torch.tensor([p]))[0, -1].numpy() for p in prompts]
    for t, llama in llamas.items():
        gap = max(float(np.abs(llama.last_logits(p) - a).max()) for p, a in zip(prompts, ours_last))
        scale = max(float(np.abs(a).max()) for a in ours_last)
        print(f"llama.cpp {t}: next-token logits after each prompt within {gap:.2e} of nanoseek's (max |logit| "
              f"{scale:.2f})")

    made: dict[str, list[list[int]]] = {}

    def ours():
        made["nanoseek"] = [o.token_ids for p in prompts for o in engine.generate([p], sp)]

    fns = {"nanoseek f32": ours}
    for t, llama in llamas.items():
        def theirs(t=t, llama=llama):
            made[t] = [llama.greedy(p, args.new_tokens, eos) for p in prompts]
        fns[f"llama.cpp {t}"] = theirs
    best = timed(fns, args.reps)

    ref = made["nanoseek"]  # both sides end a sequence with its end-of-sequence token
    n = sum(map(len, ref))
    for t in llamas:
        equal = sum(a == b for a, b in zip(made[t], ref))
        same = sum(x == y for a, b in zip(made[t], ref) for x, y in zip(a, b))
        print(f"llama.cpp {t}: greedy tokens equal the engine's on {equal}/{len(ref)} prompts "
              f"({same}/{n} tokens in place)")
        if t == "f32" and args.ckpt:
            assert made[t] == ref, "llama.cpp f32 wrote other tokens than the engine"
    base = best["nanoseek f32"]
    print("batch 1: " + " | ".join(f"{name} {n / s:.1f} tok/s" for name, s in best.items()))
    print("    " + ", ".join(f"{name} x{base / s:.2f} of nanoseek f32" for name, s in best.items()
                          if name != "nanoseek f32"))


if __name__ == "__main__":
    main()
