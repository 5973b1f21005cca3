"""Bad command lines, across every command: each exits 2 with exactly one stderr line that names
the offending flag (or file, or field) and, for a value out of range, the range allowed, and no
traceback. A user who mistypes a flag must learn which one and what it takes, not read a stack.

The lines run in-process through `nanoseek.cli.main` (the checks all happen before a model is
built or a run directory written, so the whole table takes seconds); one runs as a real
process, to see the exit status and stderr a shell sees; `--debug` brings the traceback back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek import cli

NO_CUDA = not torch.cuda.is_available()
TINY = ["--preset", "tiny", "--out", "{out}"]
SFT = ["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "builtin:sft-arith?n=4"]
GRPO = ["grpo", "--ckpt", "{ckpt}", "--task", "arithmetic", "--out", "{out}"]
EVAL = ["eval", "--ckpt", "{ckpt}", "--task", "arithmetic"]
GEN = ["generate", "--ckpt", "{ckpt}", "--prompt", "hi"]
SERVE = ["serve", "--ckpt", "{ckpt}"]
TOK = ["tokenizer", "train", "--out", "{out}"]
DIST = ["distill", "--teacher", "{ckpt}", "--student", "dense-tiny", "--data", "builtin:sft-arith?n=4", "--out", "{out}"]
TRACES = ["distill", "traces", "--teacher", "{ckpt}", "--task", "arithmetic", "--out", "{out}"]
PREP = ["data", "prepare", "--data", "builtin:arith?n=4", "--tokenizer", "{ckpt}", "--out", "{out}"]
MTP = ["mtp-refresh", "--ckpt", "{ckpt}", "--out", "{out}"]

# (argv, what the one stderr line must contain): {ckpt} a good checkpoint, {run} a finished run
# directory (RUN/model), {out} a fresh path, {file} a text file, {binary} bytes that are not
# UTF-8, {bad_jsonl} a jsonl whose second line is not JSON, {empty} an empty directory,
# {unfinished} a run directory without model/, {missing} a path that does not exist
ROWS: list[tuple[list[str], list[str]]] = [
    # ------------------------------------------------------------------ the parser itself
    (["nosuchcommand"], ["argument COMMAND: invalid choice: 'nosuchcommand'"]),
    (["info", "--preset", "tiny", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["tokenizer"], ["required: {train}"]),
    (["data", "clean"], ["invalid choice: 'clean'"]),
    # ------------------------------------------------------------------ info
    (["info"], ["exactly one of --preset", "--ckpt"]),
    (["info", "--preset", "tiny", "--ckpt", "{ckpt}"], ["exactly one of --preset", "--ckpt"]),
    (["info", "--preset", "huge"], ["--preset 'huge'", "tiny, small"]),
    (["info", "--preset", "tiny", "--seq-len", "0"], ["--seq-len 0", "≥ 1"]),
    (["info", "--preset", "tiny", "--seq-len", "abc"], ["argument --seq-len: invalid int value: 'abc'"]),
    (["info", "--preset", "tiny", "--dtype", "int3"], ["argument --dtype: invalid choice: 'int3'", "bfloat16"]),
    (["info", "--ckpt", "{missing}"], ["--ckpt {missing}", "no such checkpoint directory"]),
    (["info", "--ckpt", "{file}"], ["--ckpt {file}", "is a file"]),
    (["info", "--ckpt", "{empty}"], ["--ckpt {empty}", "empty directory"]),
    (["info", "--ckpt", "{unfinished}"], ["--ckpt {unfinished}", "no model/"]),
    (["info", "--ckpt", "{bad_config}"], ["{bad_config}/config.json", "not valid JSON"]),
    # ------------------------------------------------------------------ --set, FIM
    (["info", "--preset", "tiny", "--set", "layers=2"], ["--set layers=2", "no model config field 'layers'"]),
    (["info", "--ckpt", "{ckpt}", "--set", "num_hidden_layers=2"], ["--set num_hidden_layers=2", "--preset"]),
    (["pretrain", *TINY, "--set", "n_group=3"], ["--set n_group=3", "not divisible by n_group=3"]),
    (["pretrain", *TINY, "--set", "num_hidden_layers"], ["--set num_hidden_layers", "expected FIELD=VALUE"]),
    (DIST + ["--set", "depth=1"], ["--set depth=1", "no model config field 'depth'"]),
    (PREP + ["--fim-rate", "2"], ["--fim-rate 2.0", "[0, 1]"]),
    (PREP + ["--fim-level", "word"], ["argument --fim-level: invalid choice: 'word'"]),
    (PREP + ["--fim-rate", "0.5", "--fim-max-chars", "-1"], ["--fim-max-chars -1", "≥ 0"]),
    (GEN + ["--suffix", "x", "--chat"], ["--suffix", "--chat"]),
    (["eval", "--ckpt", "{ckpt}", "--task", "fim"], ["--task fim", "needs --data"]),
    # ------------------------------------------------------------------ cost, report
    (["cost"], ["exactly one of --preset", "--ckpt"]),
    (["cost", "--preset", "tiny"], ["--pretrain-tokens", "no recipe"]),
    (["cost", "--preset", "v3-671b", "--hardware", "TPU"], ["argument --hardware: invalid choice: 'TPU'"]),
    (["cost", "--preset", "v3-671b", "--mfu", "1.5"], ["--mfu 1.5", "[0, 1]"]),
    (["cost", "--preset", "v3-671b", "--price-per-hour", "nan"], ["--price-per-hour nan", "finite"]),
    (["cost", "--preset", "v3-671b", "--hardware", "cpu", "--dtype", "float8"], ["--dtype float8", "no FP8"]),
    (["report", "{missing}"], ["RUN {missing}", "no such directory"]),
    (["report", "{file}"], ["RUN {file}", "is a file"]),
    (["report", "{empty}"], ["{empty}", "holds no stage run directories"]),
    # ------------------------------------------------------------------ export, compress --method experts
    (["export", "--ckpt", "{ckpt}"], ["the following arguments are required: --out"]),
    (["export", "--ckpt", "{ckpt}", "--out", "{out}", "--type", "q4_0"], ["argument --type: invalid choice: 'q4_0'"]),
    (["export", "--ckpt", "{missing}", "--out", "{out}"], ["--ckpt {missing}", "no such checkpoint directory"]),
    (["export", "--ckpt", "{ckpt}", "--out", "{empty}"], ["--out {empty}", "is a directory"]),
    (["compress", "--ckpt", "{ckpt}", "--method", "experts", "--score", "often", "--out", "{out}"],
     ["argument --score: invalid choice: 'often'"]),
    (["compress", "--ckpt", "{ckpt}", "--method", "experts", "--sparsity", "0.75", "--out", "{out}"],
     ["--sparsity 0.75", "fewer than 2 per expert group"]),
    # ------------------------------------------------------------------ tokenizer train
    (TOK + ["--data", "builtin:arith?n=10", "--vocab-size", "0"], ["--vocab-size 0", "≥ 276"]),
    (TOK + ["--data", "builtin:arith?n=10", "--vocab-size", "100"], ["--vocab-size 100", "≥ 276"]),
    (TOK + ["--data", "builtin:arith?n=10", "--max-docs", "0"], ["--max-docs 0", "≥ 1"]),
    (TOK + ["--data", "{missing}"], ["--data", "{missing}", "no such file"]),
    (TOK + ["--data", "{binary}"], ["{binary}", "not valid UTF-8"]),
    (TOK + ["--data", "{bad_jsonl}"], ["{bad_jsonl}:2", "invalid JSON"]),
    (TOK + ["--data", "builtin:nope"], ["builtin:nope", "unknown built-in corpus 'nope'"]),
    (TOK + ["--data", "builtin:arith?bogus=1"], ["builtin:arith?bogus=1", "bogus"]),
    (TOK + ["--data", "builtin:arith?n=0"], ["--data 'builtin:arith?n=0'", "n=0", "≥ 1"]),
    (TOK + ["--data", "{empty}"], ["{empty}", "holds no supported files"]),
    (["tokenizer", "train", "--data", "builtin:arith"], ["the following arguments are required: --out"]),
    (TOK + ["--data", "builtin:arith?n=10", "--text-field", ""], ["--text-field", "non-empty"]),
    # ------------------------------------------------------------------ data prepare
    (["data", "prepare", "--data", "{missing}", "--tokenizer", "{ckpt}", "--out", "{out}"], ["{missing}", "no such file"]),
    (PREP[:4] + ["--tokenizer", "{missing}", "--out", "{out}"], ["--tokenizer", "{missing}"]),
    (PREP[:4] + ["--tokenizer", "{empty}", "--out", "{out}"], ["--tokenizer", "tokenizer.json"]),
    (["data", "prepare", "--data", "{binary}", "--tokenizer", "{ckpt}", "--out", "{out}", "--workers", "0"],
     ["{binary}", "not valid UTF-8"]),
    (PREP + ["--normalize", "NFX"], ["--normalize 'NFX'", "NFC, NFKC, none"]),
    (PREP + ["--workers", "-1"], ["--workers -1", "≥ 0"]),
    (PREP + ["--chunk-docs", "0"], ["--chunk-docs 0", "≥ 1"]),
    (PREP + ["--shard-tokens", "0"], ["--shard-tokens 0", "≥ 1"]),
    (PREP + ["--num-perm", "0"], ["--num-perm 0", "≥ 1"]),
    (PREP + ["--shingle-words", "0"], ["--shingle-words 0", "≥ 1"]),
    (PREP + ["--max-docs", "-1"], ["--max-docs -1", "≥ 1"]),
    (PREP + ["--near-dup-threshold", "1.5"], ["--near-dup-threshold 1.5", "[0, 1]"]),
    (PREP + ["--min-alpha-ratio", "2"], ["--min-alpha-ratio 2.0", "[0, 1]"]),
    (PREP + ["--min-chars", "-1"], ["--min-chars -1", "≥ 0"]),
    (PREP + ["--profile", "json"], ["argument --profile: invalid choice: 'json'", "prose", "code"]),
    (PREP + ["--val-fraction", "1"], ["--val-fraction 1.0", "[0, 1)"]),
    (PREP + ["--max-line-length", "0"], ["--max-line-length 0", "≥ 1"]),
    (PREP + ["--max-data-line-fraction", "1.5"], ["--max-data-line-fraction 1.5", "[0, 1]"]),
    (PREP[:3] + ["hf:nobody/nothing?splt=train"] + PREP[4:], ["hf:nobody/nothing?splt=train", "hf:NAME[:CONFIG]"]),
    (PREP[:3] + ["builtin:stdlib?split=test"] + PREP[4:], ["builtin:stdlib?split=test", "train, validation, all"]),
    (PREP[:6] + ["--out", "{file}"], ["--out {file}", "is a file"]),
    # ------------------------------------------------------------------ pretrain
    (["pretrain", *TINY, "--max-steps", "-5"], ["--max-steps -5", "≥ 1"]),
    (["pretrain", *TINY, "--max-steps", "0"], ["--max-steps 0", "≥ 1"]),
    (["pretrain", *TINY, "--max-steps", "ten"], ["argument --max-steps: invalid int value: 'ten'"]),
    (["pretrain", *TINY, "--batch-size", "0"], ["--batch-size 0", "≥ 1"]),
    (["pretrain", *TINY, "--batch-size", "-3"], ["--batch-size -3", "≥ 1"]),
    (["pretrain", *TINY, "--seq-len", "257"], ["--seq-len 257", "max_position_embeddings=256"]),
    (["pretrain", *TINY, "--seq-len", "0"], ["--seq-len 0", "≥ 1"]),
    (["pretrain", *TINY, "--learning-rate", "0"], ["--learning-rate 0.0", "> 0"]),
    (["pretrain", *TINY, "--learning-rate", "-0.001"], ["--learning-rate -0.001", "> 0"]),
    (["pretrain", *TINY, "--learning-rate", "nan"], ["--learning-rate nan", "finite", "> 0"]),
    (["pretrain", *TINY, "--learning-rate", "inf"], ["--learning-rate inf", "finite"]),
    (["pretrain", *TINY, "--warmup-steps", "20", "--max-steps", "10"], ["--warmup-steps 20", "--max-steps 10"]),
    (["pretrain", *TINY, "--warmup-steps", "-1"], ["--warmup-steps -1", "≥ 0"]),
    (["pretrain", *TINY, "--dtype", "float16"], ["argument --dtype: invalid choice: 'float16'", "bfloat16"]),
    (["pretrain", *TINY, "--schedule", "linear"], ["argument --schedule: invalid choice: 'linear'", "wsd"]),
    (["pretrain", *TINY, "--device", "tpu9"], ["--device 'tpu9'", "cpu, cuda"]),
    (["pretrain", *TINY, "--device", "meta"], ["--device meta", "cpu, cuda"]),
    (["pretrain", *TINY, "--preset", "huge"], ["--preset 'huge'", "tiny, small"]),
    (["pretrain", *TINY, "--data", "{missing}"], ["--data", "{missing}"]),
    (["pretrain", *TINY, "--data", "builtin:nope"], ["builtin:nope", "'nope'"]),
    (["pretrain", *TINY, "--data", "builtin:arith?n=0"], ["--data 'builtin:arith?n=0'", "n=0", "≥ 1"]),
    (["pretrain", *TINY, "--data", "builtin:arith?bogus=1"], ["builtin:arith?bogus=1", "bogus"]),
    (["pretrain", *TINY, "--data", "builtin:arith?n=x"], ["builtin:arith?n=x", "integers"]),
    (["pretrain", *TINY, "--tokenizer", "{missing}"], ["--tokenizer {missing}", "no such"]),
    (["pretrain", *TINY, "--gradient-accumulation-steps", "0"], ["--gradient-accumulation-steps 0", "≥ 1"]),
    (["pretrain", *TINY, "--batch-size", "6", "--gradient-accumulation-steps", "4"],
     ["--batch-size 6", "--gradient-accumulation-steps 4", "multiple"]),
    (["pretrain", *TINY, "--max-grad-norm", "-1"], ["--max-grad-norm -1.0", "≥ 0"]),
    (["pretrain", *TINY, "--weight-decay", "nan"], ["--weight-decay nan", "≥ 0"]),
    (["pretrain", *TINY, "--min-lr-ratio", "2"], ["--min-lr-ratio 2.0", "[0, 1]"]),
    (["pretrain", *TINY, "--decay-fraction", "0"], ["--decay-fraction 0.0", "(0, 1]"]),
    (["pretrain", *TINY, "--beta1", "1"], ["--beta1 1.0", "[0, 1)"]),
    (["pretrain", *TINY, "--beta2", "-0.5"], ["--beta2 -0.5", "[0, 1)"]),
    (["pretrain", *TINY, "--mtp-weight", "-1"], ["--mtp-weight -1.0", "≥ 0"]),
    (["pretrain", *TINY, "--vocab-size", "-1"], ["--vocab-size -1", "≥ 0"]),
    (["pretrain", *TINY, "--val-tokens", "0"], ["--val-tokens 0", "≥ 1"]),
    (["pretrain", *TINY, "--arith-eval", "-1"], ["--arith-eval -1", "≥ 0"]),
    (["pretrain", *TINY, "--arith-digits", "0"], ["--arith-digits 0", "≥ 1"]),
    (["pretrain", *TINY, "--max-minutes", "-1"], ["--max-minutes -1.0", "≥ 0"]),
    (["pretrain", *TINY, "--max-minutes", "nan"], ["--max-minutes nan", "≥ 0"]),
    (["pretrain", *TINY, "--threads", "-1"], ["--threads -1", "≥ 0"]),
    (["pretrain", *TINY, "--logging-steps", "0"], ["--logging-steps 0", "≥ 1"]),
    (["pretrain", *TINY, "--keep-last", "-1"], ["--keep-last -1", "≥ 0"]),
    (["pretrain", *TINY, "--router-gamma", "nan"], ["--router-gamma nan", "≥ 0"]),
    (["pretrain", *TINY, "--progress", "maybe"], ["argument --progress: expected true/false, got 'maybe'"]),
    (["pretrain", "--preset", "tiny", "--out", "{file}"], ["--out {file}", "is a file"]),
    (["pretrain", "--out", "{bad_run}", "--resume"], ["{bad_run}/config.json", "not valid JSON"]),
    # ------------------------------------------------------------------ sft
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "builtin:sft-arith?n=0"],
     ["--data 'builtin:sft-arith?n=0'", "n=0", "≥ 1"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "builtin:sft-arith?n=-3"], ["--data", "n=-3", "≥ 1"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "builtin:sft-arith?digits=abc"],
     ["--data 'builtin:sft-arith?digits=abc'", "digits", "an integer", "'abc'"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "builtin:sft-arith?bogus=1"],
     ["--data 'builtin:sft-arith?bogus=1'", "bogus", "digits"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "builtin:sft-arith?digits=0"], ["--data", "digits"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "builtin:sft-arith?n=4&&"], ["--data", "builtin:sft-arith?n=4&&"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "builtin:sft-nope"], ["builtin:sft-nope", "builtin:sft-arith"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "{binary}"], ["{binary}", "not valid UTF-8"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "{bad_jsonl}"], ["{bad_jsonl}:2", "not valid JSON"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "{missing}"], ["{missing}", "no such file"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}", "--data", "{empty_jsonl}"], ["{empty_jsonl}", "no conversations"]),
    (["sft", "--ckpt", "{ckpt}", "--out", "{out}"], ["the following arguments are required: --data"]),
    (["sft", "--ckpt", "{file}", "--out", "{out}", "--data", "builtin:sft-arith"], ["--ckpt {file}", "is a file"]),
    (["sft", "--ckpt", "{empty}", "--out", "{out}", "--data", "builtin:sft-arith"], ["--ckpt {empty}", "empty directory"]),
    (["sft", "--ckpt", "{unfinished}", "--out", "{out}", "--data", "builtin:sft-arith"], ["--ckpt {unfinished}", "no model/"]),
    (["sft", "--ckpt", "{missing}", "--out", "{out}", "--data", "builtin:sft-arith"], ["--ckpt {missing}", "no such"]),
    ([*SFT, "--epochs", "0"], ["--epochs 0.0", "> 0"]),
    ([*SFT, "--epochs", "nan"], ["--epochs nan", "> 0"]),
    ([*SFT, "--max-steps", "-1"], ["--max-steps -1", "≥ 0"]),
    ([*SFT, "--batch-size", "0"], ["--batch-size 0", "≥ 1"]),
    ([*SFT, "--seq-len", "0"], ["--seq-len 0", "≥ 1"]),
    ([*SFT, "--seq-len", "99999"], ["--seq-len 99999", "max_position_embeddings=256"]),
    ([*SFT, "--learning-rate", "nan"], ["--learning-rate nan", "> 0"]),
    ([*SFT, "--warmup-steps", "50", "--max-steps", "10"], ["--warmup-steps 50", "--max-steps 10"]),
    ([*SFT, "--dtype", "fp8"], ["argument --dtype: invalid choice: 'fp8'"]),
    # ------------------------------------------------------------------ grpo
    ([*GRPO, "--task-args", "[1]"], ["--task-args", "a JSON object", "[1]"]),
    ([*GRPO, "--task-args", '{"digits": "x"}'], ["--task-args", "digits", "an integer", "'x'"]),
    ([*GRPO, "--task-args", '{"bogus": 1}'], ["--task-args", "bogus", "digits"]),
    ([*GRPO, "--task-args", "{"], ["argument --task-args: not valid JSON"]),
    ([*GRPO, "--task-args", '{"ops": "/"}'], ["--task-args", "ops"]),
    (["grpo", "--ckpt", "{ckpt}", "--task", "nope", "--out", "{out}"], ["--task 'nope'", "arithmetic"]),
    ([*GRPO, "--num-generations", "1"], ["--num-generations", ">= 2"]),
    ([*GRPO, "--prompts-per-step", "0"], ["--prompts-per-step 0", "≥ 1"]),
    ([*GRPO, "--max-completion-length", "0"], ["--max-completion-length 0", "≥ 1"]),
    ([*GRPO, "--num-iterations", "0"], ["--num-iterations", ">= 1"]),
    ([*GRPO, "--temperature", "0"], ["--temperature 0.0", "> 0"]),
    ([*GRPO, "--top-p", "0"], ["--top-p 0.0", "(0, 1]"]),
    ([*GRPO, "--beta", "-1"], ["--beta -1.0", "≥ 0"]),
    ([*GRPO, "--epsilon", "nan"], ["--epsilon nan", "[0, 1)"]),
    ([*GRPO, "--epsilon-high", "0.1"], ["--epsilon-high 0.1", "≥ --epsilon 0.2"]),
    ([*GRPO, "--eval-problems", "0"], ["--eval-problems 0", "≥ 1"]),
    ([*GRPO, "--reward-weights", "1", "2", "3"], ["--reward-weights has 3 values for 2 --reward-funcs"]),
    ([*GRPO, "--template", "raw"], ["argument --template: invalid choice: 'raw'"]),
    ([*GRPO, "--loss-type", "ppo"], ["argument --loss-type: invalid choice: 'ppo'"]),
    ([*GRPO, "--max-steps", "-5"], ["--max-steps -5", "≥ 1"]),
    ([*GRPO, "--learning-rate", "0"], ["--learning-rate 0.0", "> 0"]),
    (["grpo", "--ckpt", "{unfinished}", "--task", "arithmetic", "--out", "{out}"], ["{unfinished}: ", "no model/"]),
    (["grpo", "--ckpt", "{file}", "--task", "arithmetic", "--out", "{out}"], ["{file}: ", "is a file"]),
    (["grpo", "--ckpt", "{empty}", "--task", "arithmetic", "--out", "{out}"], ["{empty}: ", "empty directory"]),
    # ------------------------------------------------------------------ eval
    ([*EVAL, "--k", "0"], ["--k 0", "≥ 1"]),
    ([*EVAL, "--n", "0"], ["--n 0", "≥ 1"]),
    ([*EVAL, "--n", "-5"], ["--n -5", "≥ 1"]),
    ([*EVAL, "--temperature", "-1"], ["--temperature -1.0", "[0, ∞)"]),
    ([*EVAL, "--temperature", "nan"], ["--temperature nan", "[0, ∞)"]),
    ([*EVAL, "--top-p", "0"], ["--top-p 0.0", "(0, 1]"]),
    ([*EVAL, "--top-p", "1.5"], ["--top-p 1.5", "(0, 1]"]),
    ([*EVAL, "--max-tokens", "0"], ["--max-tokens 0", "≥ 1"]),
    ([*EVAL, "--seed", str(2**64)], ["--seed 18446744073709551616", "[-2^63, 2^63)"]),
    ([*EVAL, "--template", "raw"], ["argument --template: invalid choice: 'raw'"]),
    ([*EVAL, "--task-args", "[1]"], ["--task-args", "a JSON object"]),
    ([*EVAL, "--task-args", '{"digits": "x"}'], ["--task-args", "digits", "an integer"]),
    ([*EVAL, "--task-args", '{"chain": 1}'], ["--task-args", "chain"]),
    ([*EVAL, "--out", "{empty}"], ["--out {empty}", "is a directory"]),
    ([*EVAL, "--speculative-tokens", "-1"], ["--speculative-tokens -1", "≥ 0"]),
    ([*GEN, "--speculative-tokens", "-2"], ["--speculative-tokens -2", "≥ 0"]),
    ([*SERVE, "--speculative-tokens", "-1"], ["--speculative-tokens -1", "≥ 0"]),
    ([*GRPO, "--speculative-tokens", "-1"], ["--speculative-tokens -1", "≥ 0"]),
    ([*GRPO, "--mtp-weight", "nan"], ["--mtp-weight nan", "finite", "≥ 0"]),
    ([*SFT, "--mtp-weight", "-1"], ["--mtp-weight -1.0", "finite", "≥ 0"]),
    # ------------------------------------------------------------------ mtp-refresh
    ([*MTP, "--speculative-tokens", "0"], ["--speculative-tokens 0", "≥ 1"]),
    ([*MTP, "--num-prompts", "0"], ["--num-prompts 0", "≥ 1"]),
    ([*MTP, "--reuse", "-1"], ["--reuse -1", "≥ 0"]),
    ([*MTP, "--temperature", "-0.5"], ["--temperature -0.5", "≥ 0"]),
    ([*MTP, "--task", "nope"], ["--task 'nope'", "arithmetic"]),
    ([*MTP, "--data", "{missing}"], ["--data {missing}", "no such file"]),
    (["mtp-refresh", "--ckpt", "{empty}", "--out", "{out}"], ["--ckpt {empty}", "empty directory"]),
    (["eval", "--ckpt", "{ckpt}", "--task", "nope"], ["--task 'nope'", "arithmetic"]),
    (["eval", "--ckpt", "{file}", "--task", "arithmetic"], ["--ckpt {file}", "is a file"]),
    (["eval", "--ckpt", "{empty}", "--task", "arithmetic"], ["--ckpt {empty}", "empty directory"]),
    (["eval", "--ckpt", "{unfinished}", "--task", "arithmetic"], ["--ckpt {unfinished}", "no model/"]),
    (["eval", "--ckpt", "{missing}", "--task", "arithmetic"], ["--ckpt {missing}", "no such"]),
    (["eval", "--ckpt", "{ckpt}"], ["exactly one of --task NAME", "or --bpb FILE|DIR"]),
    (["eval", "--ckpt", "{ckpt}", "--bpb", "{file}", "--seq-len", "0"], ["--seq-len 0", "≥ 1"]),
    (["eval", "--ckpt", "{ckpt}", "--bpb", "{missing}"], ["{missing}", "no such file"]),
    # ------------------------------------------------------------------ distill, distill traces
    (["distill"], ["the following arguments are required: --out, --teacher, --student, --data"]),
    ([*DIST, "--loss", "kd"], ["argument --loss: invalid choice: 'kd'", "reverse_kl"]),
    ([*DIST, "--loss", "kl", "--beta", "0.5"], ["--beta 0.5", "--loss kl is β = 0", "--loss jsd"]),
    ([*DIST, "--loss", "jsd", "--beta", "2"], ["--beta 2.0", "[0, 1]"]),
    ([*DIST, "--loss", "sft", "--beta", "0.5"], ["--beta 0.5", "--loss sft has no divergence"]),
    ([*DIST, "--lmbda", "0.5"], ["--lmbda 0.5", "--loss on_policy only"]),
    ([*DIST, "--loss", "on_policy", "--lmbda", "1.5"], ["--lmbda 1.5", "[0, 1]"]),
    ([*DIST, "--temperature", "0"], ["--temperature 0.0", "> 0"]),
    ([*DIST, "--loss", "on_policy", "--max-new-tokens", "300"], ["--max-new-tokens 300", "--seq-len 256"]),
    ([*DIST, "--max-new-tokens", "0"], ["--max-new-tokens 0", "≥ 1"]),
    ([*DIST, "--epochs", "0"], ["--epochs 0.0", "> 0"]),
    ([*DIST, "--student", "nope"], ["--student nope", "neither a preset", "dense-small"]),
    ([*DIST, "--student", "{file}"], ["--student {file}", "is a file"]),
    ([*DIST, "--teacher", "{missing}"], ["--teacher {missing}", "no such checkpoint directory"]),
    ([*DIST, "--data", "builtin:nope"], ["builtin:nope", "unknown built-in SFT set"]),
    ([*DIST, "--data", "{missing}"], ["--data", "{missing}", "no such file"]),
    ([*DIST, "--data", "{bad_jsonl}"], ["{bad_jsonl}:2", "not valid JSON"]),
    ([*DIST, "--seq-len", "300"], ["--seq-len 300", "the student's context", "max_position_embeddings=256"]),
    ([*DIST[:4], "dense-small", *DIST[5:], "--seq-len", "300"], ["--seq-len 300", "the teacher's context"]),
    (TRACES[:2] + TRACES[4:], ["exactly one of --teacher DIR or --teacher-url URL"]),
    ([*TRACES, "--teacher-url", "http://127.0.0.1:9"], ["exactly one of --teacher DIR or --teacher-url URL"]),
    (TRACES[:2] + ["--teacher-url", "ftp://x"] + TRACES[4:], ["--teacher-url 'ftp://x'", "http://"]),
    ([*TRACES, "--k", "0"], ["--k 0", "≥ 1"]),
    ([*TRACES, "--n", "0"], ["--n 0", "≥ 1"]),
    ([*TRACES, "--temperature", "-1"], ["--temperature -1.0", "≥ 0"]),
    ([*TRACES, "--top-p", "0"], ["--top-p 0.0", "(0, 1]"]),
    ([*TRACES, "--task", "nope"], ["--task 'nope'", "arithmetic"]),
    ([*TRACES, "--task-args", '{"digits": "x"}'], ["--task-args", "digits", "an integer"]),
    ([*TRACES, "--device", "tpu9"], ["--device 'tpu9'", "cpu, cuda"]),
    (["distill", "traces", "--teacher", "{missing}", "--task", "arithmetic", "--out", "{out}"],
     ["--teacher {missing}", "no such checkpoint directory"]),
    ([*TRACES[:-1], "{file}"], ["--out {file}", "is a file"]),
    # ------------------------------------------------------------------ generate, chat, serve
    (["generate", "--ckpt", "{ckpt}"], ["--prompt", "required"]),
    ([*GEN, "--max-tokens", "0"], ["--max-tokens 0", "≥ 1"]),
    ([*GEN, "--top-p", "1.5"], ["--top-p 1.5", "[0, 1]"]),
    ([*GEN, "--temperature", "nan"], ["--temperature nan", "[0, ∞)"]),
    ([*GEN, "--dtype", "int8"], ["--dtype 'int8'", "float32 or bfloat16"]),
    ([*GEN, "--device", "banana"], ["--device 'banana'", "cpu, cuda"]),
    (["generate", "--ckpt", "{empty}", "--prompt", "hi"], ["--ckpt {empty}", "empty directory"]),
    (["generate", "--ckpt", "{unfinished}", "--prompt", "hi"], ["--ckpt {unfinished}", "no model/"]),
    (["chat", "--ckpt", "{unfinished}"], ["--ckpt {unfinished}", "no model/"]),
    (["chat", "--ckpt", "{empty}"], ["--ckpt {empty}", "empty directory"]),
    (["chat", "--ckpt", "{ckpt}", "--top-k", "-1"], ["--top-k -1", "≥ 0"]),
    (["serve", "--ckpt", "{empty}"], ["--ckpt {empty}", "empty directory"]),
    (["serve", "--ckpt", "{unfinished}"], ["--ckpt {unfinished}", "no model/"]),
    ([*SERVE, "--port", "99999"], ["--port 99999", "[0, 65535]"]),
    ([*SERVE, "--block-size", "0"], ["--block-size 0", "≥ 1"]),
    ([*SERVE, "--log-level", "loud"], ["argument --log-level: invalid choice: 'loud'"]),
    ([*SERVE, "--api-key", ""], ["--api-key", "empty"]),
    (["serve"], ["the following arguments are required: --ckpt"]),
]
if NO_CUDA:
    ROWS += [(["pretrain", *TINY, "--device", "cuda"], ["--device cuda", "no CUDA device"]),
             ([*EVAL, "--device", "cuda"], ["--device cuda", "no CUDA device"])]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, ckpt):
    """The files and directories the table's placeholders name."""
    root = tmp_path_factory.mktemp("bad")
    (root / "a-file.txt").write_text("some text\n")
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x81" * 8)
    good = {"text": "hi", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    (root / "bad.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    (root / "empty.jsonl").write_text("\n")
    (root / "empty").mkdir()
    unfinished = root / "unfinished"  # a run interrupted before it wrote RUN/model
    (unfinished / "checkpoints" / "step_000002").mkdir(parents=True)
    (unfinished / "config.json").write_text(json.dumps({"max_steps": 10, "out": str(unfinished)}))
    (unfinished / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    bad_config = root / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    bad_run = root / "bad-run"
    bad_run.mkdir()
    (bad_run / "config.json").write_text("{not json")
    return {"ckpt": ckpt, "file": root / "a-file.txt", "binary": root / "binary.txt", "bad_jsonl": root / "bad.jsonl",
            "empty_jsonl": root / "empty.jsonl", "empty": root / "empty", "unfinished": unfinished,
            "bad_config": bad_config, "bad_run": bad_run, "missing": root / "no-such-path"}


def _fill(items: list[str], paths: dict, out: Path) -> list[str]:
    def one(s: str) -> str:
        for name, p in {"out": out, **paths}.items():
            s = s.replace("{" + name + "}", str(p))
        return s

    return [one(s) for s in items]


def _one_line_error(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, expect", ROWS, ids=[" ".join(a)[:90] for a, _ in ROWS])
def test_bad_command_line_is_one_line_naming_the_flag(argv, expect, paths, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("started the server on a bad command line"))
    monkeypatch.setattr("nanoseek.train.loop.Trainer.fit", lambda *a, **k: pytest.fail("trained on a bad command line"))
    monkeypatch.setattr("nanoseek.engine.engine.Engine.__init__",
                        lambda *a, **k: pytest.fail("built an engine on a bad command line"))
    monkeypatch.delenv("NANOSEEK_API_KEYS", raising=False)
    out = tmp_path / "out"
    argv, expect = _fill(argv, paths, out), _fill(expect, paths, out)
    rc, err = _one_line_error(argv, capsys)
    assert rc == 2, (argv, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nanoseek") and ": error: " in lines[0], err
    for part in expect:
        assert part in lines[0], (part, lines[0])
    assert not out.exists() or not any(out.iterdir()), "a refused command wrote its output"


def test_the_table_covers_every_command():
    used = {" ".join(a[:2]) if a[0] in cli.GROUPS and a[1:2] and a[1] in cli.GROUPS[a[0]] else a[0] for a, _ in ROWS}
    every = set(cli.COMMANDS) | {f"{g} {c}" for g, cmds in cli.GROUPS.items() for c in cmds}
    assert every <= used, every - used
    assert len(ROWS) >= 100


# ---------------------------------------------------------------------- --debug and real processes
def test_debug_reraises_the_user_error_with_its_traceback(paths, capsys):
    for argv in (["--debug", "pretrain", "--preset", "tiny", "--max-steps", "-5"],
                 ["pretrain", "--preset", "tiny", "--max-steps", "-5", "--debug"]):
        with pytest.raises(ValueError, match="--max-steps -5: must be ≥ 1"):
            cli.main(argv)
    assert cli.main(["pretrain", "--preset", "tiny", "--max-steps", "-5"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _nanoseek(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nanoseek.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_real_process_exits_2_with_one_line(paths, tmp_path):
    bad = ["sft", "--ckpt", str(paths["ckpt"]), "--out", str(tmp_path / "run"), "--data", str(paths["binary"])]
    p = _nanoseek(*bad)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("nanoseek sft: error: ") and str(paths["binary"]) in p.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- --ckpt RUN
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ckpt):
    """A finished one-step SFT run: RUN/model beside RUN/config.json (a run config, not a model's)."""
    from nanoseek.train.sft import SFTConfig, sft

    run = tmp_path_factory.mktemp("runs") / "sft"
    sft(SFTConfig(ckpt=str(ckpt), data="builtin:sft-arith?n=4", out=str(run), max_steps=1, warmup_steps=0,
                  batch_size=2, seq_len=128, progress=False))
    assert (run / "model" / "model.safetensors").is_file() and "epochs" in json.loads((run / "config.json").read_text())
    return run


def test_generate_and_eval_take_a_run_directory(tiny_run, capsys, tmp_path):
    import nanoseek
    from nanoseek.checkpoint import resolve_ckpt

    assert resolve_ckpt(tiny_run) == tiny_run / "model" and resolve_ckpt(tiny_run / "model") == tiny_run / "model"
    args = ["--prompt", "Q: 1+2", "--temperature", "0", "--max-tokens", "4", "--seed", "1", "--device", "cpu"]
    assert cli.main(["generate", "--ckpt", str(tiny_run), *args]) == 0
    from_run = capsys.readouterr().out
    assert cli.main(["generate", "--ckpt", str(tiny_run / "model"), *args]) == 0
    assert capsys.readouterr().out == from_run and from_run.startswith("Q: 1+2")

    res = tmp_path / "eval.json"
    argv = ["eval", "--ckpt", str(tiny_run), "--task", "arithmetic", "--n", "3", "--k", "1", "--temperature", "0",
            "--max-tokens", "4", "--out", str(res)]
    assert cli.main(argv) == 0
    got = json.loads(res.read_text())
    assert got["n"] == 3 and got["k"] == 1 and 0.0 <= got["pass@1"] <= 1.0
    assert cli.main([*argv[:2], str(tiny_run / "model"), *argv[3:]]) == 0
    assert json.loads(res.read_text()) == got

    model = nanoseek.load_model(tiny_run)
    ref = nanoseek.load_model(tiny_run / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    engine = nanoseek.Engine(str(tiny_run), device="cpu")
    assert engine.tokenizer is not None and engine.config.vocab_size == ref.config.vocab_size


def test_info_takes_a_run_directory(tiny_run, capsys):
    assert cli.main(["info", "--ckpt", str(tiny_run)]) == 0
    assert "parameters, total" in capsys.readouterr().out


def test_the_unfinished_run_message_points_at_its_checkpoints(paths):
    from nanoseek.checkpoint import resolve_ckpt

    with pytest.raises(FileNotFoundError, match="step_000002") as e:
        resolve_ckpt(paths["unfinished"])
    assert str(paths["unfinished"]) in str(e.value) and "--resume" in str(e.value)
