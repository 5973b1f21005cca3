"""Task accuracy of a checkpoint: `nanoseek eval --ckpt DIR --task arithmetic [--k 8]`.

pass@1 and maj@k over held-out (test-split) problems with *pinned* sampling: the temperature
and a seed per (problem, sample) are fixed, so two runs of the same checkpoint give the same
number and two checkpoints are compared on the same draws. k samples per problem; pass@1 is
the mean correctness over all k (lower variance than one sample), maj@k the majority answer.
temperature 0 is greedy (then k is forced to 1: all samples would be identical).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.speculative import SPECULATIVE_TOKENS_HELP, check_speculative_tokens
from .metrics import maj_at_k, pass_at_1, pass_at_k


@dataclass
class EvalConfig:
    ckpt: str = field(metadata={"help": "checkpoint directory, or any stage's run directory (its model/)"})
    task: str | None = field(default=None, metadata={"help": "arithmetic | countdown | gsm8k | fim (hidden-line exact match on --data); or --bpb"})
    task_args: dict = field(default_factory=dict, metadata={"help": 'task knobs as JSON, e.g. {"digits": 3}'})
    template: str = field(default="chat", metadata={"choices": ["chat", "r1-zero"]})
    n: int = field(default=200, metadata={"help": "held-out problems"})
    k: int = field(default=8, metadata={"help": "samples per problem (maj@k, pass@k)"})
    temperature: float = field(default=0.7, metadata={"help": "pinned sampling temperature (0: greedy, k=1)"})
    top_p: float = 1.0
    seed: int = field(default=1234, metadata={"help": "pins the problems and every sample's seed"})
    max_tokens: int = 128
    bpb: str | None = field(default=None, metadata={"help": "instead of a task: bits per byte on this held-out text "
                                                    "(a file, folder, glob or builtin:stdlib?split=validation)"})
    seq_len: int | None = field(default=None, metadata={"help": "--bpb: tokens per scored window (default: the "
                                                        "model's context)"})
    out: str | None = field(default=None, metadata={"help": "write the result JSON here"})
    data: str | None = field(default=None, metadata={"help": "held-out code for --task fim: a .py file, a folder or "
                                                     "builtin:stdlib?split=validation"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: cuda if available)"})
    speculative_tokens: int = field(default=0, metadata={"help": SPECULATIVE_TOKENS_HELP})

    def __post_init__(self) -> None:
        """Bad values are one line naming the flag and its range, before the checkpoint is read
        (a model given to evaluate_task directly needs no --ckpt, so that one is checked there)."""
        from ..engine.engine import check_device
        from ..tasks import task_from_flags

        check_speculative_tokens(self.speculative_tokens)
        if (self.task is None) == (self.bpb is None):
            raise ValueError("exactly one of --task NAME (held-out problems) or --bpb FILE|DIR (bits per byte) is needed")
        if self.bpb is not None:
            if self.seq_len is not None and self.seq_len < 1:
                raise ValueError(f"--seq-len {self.seq_len}: must be ≥ 1")
            if self.out is not None and Path(self.out).is_dir():
                raise ValueError(f"--out {self.out}: is a directory; expected the path of the result JSON file")
            check_device(self.device)
            return
        for name in ("n", "k", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be ≥ 1")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"--temperature {self.temperature}: must be a finite number in [0, ∞) (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")
        if not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"--seed {self.seed}: must be in [-2^63, 2^63)")
        if self.template not in ("chat", "r1-zero"):
            raise ValueError(f"--template {self.template!r}: expected chat or r1-zero")
        if self.task == "fim":
            if not self.data:
                raise ValueError("--task fim: needs --data (held-out Python code: a .py file, a folder or "
                                 "builtin:stdlib?split=validation)")
        else:
            task_from_flags(self.task, self.task_args)
        if self.out is not None and Path(self.out).is_dir():
            raise ValueError(f"--out {self.out}: is a directory; expected the path of the result JSON file")
        check_device(self.device)


def sample_seed(seed: int, problem: int, sample: int) -> int:
    """The pinned seed of sample j of problem i: a run's figures repeat, and `distill traces`
    draws the same samples locally and from a server."""
    return (seed * 1_000_003 + problem * 1009 + sample) % 2**63


def evaluate_task(cfg: EvalConfig, model=None, tok=None) -> dict:
    """Score a checkpoint (or a live model + tokenizer) on held-out problems."""
    from ..engine import SamplingParams
    from ..tasks import get_task
    from ..tasks.rewards import format_reward
    from ..train.grpo import build_prompt, reward_kwargs

    if cfg.task == "fim":
        return _evaluate_fim(cfg, model, tok)
    task = get_task(cfg.task, **cfg.task_args)
    engine, tok = _engine(cfg, model, tok)
    problems = task.make(cfg.n, cfg.seed, split="test")
    k = 1 if cfg.temperature <= 0 else cfg.k
    prompts, params = [], []
    for i, p in enumerate(problems):
        ids = build_prompt(p, tok, cfg.template)
        for j in range(k):
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                         top_p=cfg.top_p, seed=sample_seed(cfg.seed, i, j)))
    outs = engine.generate(prompts, params)
    texts = [tok.decode(o.token_ids) for o in outs]
    answers = [task.parse(t) for t in texts]
    correct = [task.check(a, p) for a, p in zip(answers, (p for p in problems for _ in range(k)))]
    fmt = format_reward(texts, [p for p in problems for _ in range(k)], **reward_kwargs(cfg.template))
    by_problem = [correct[i * k:(i + 1) * k] for i in range(len(problems))]
    res = {
        "task": cfg.task, "task_args": cfg.task_args, "template": cfg.template, "n": len(problems),
        "k": k, "temperature": cfg.temperature, "seed": cfg.seed,
        "pass@1": pass_at_1(by_problem),
        f"pass@{k}": sum(pass_at_k(k, sum(c), k) for c in by_problem) / len(problems),
        f"maj@{k}": maj_at_k([answers[i * k:(i + 1) * k] for i in range(len(problems))],
                             [p.answer for p in problems]),
        "format": sum(fmt) / len(fmt),
        "truncated": sum(o.finish_reason == "length" for o in outs) / len(outs),
    }
    return res


def _engine(cfg: EvalConfig, model=None, tok=None):
    """The engine (and tokenizer) an evaluation generates with: the given model, or --ckpt's."""
    from ..checkpoint import ckpt_flag
    from ..engine import Engine
    from ..tokenizer import Tokenizer

    if model is not None:
        return Engine(model, tok, speculative_tokens=cfg.speculative_tokens), tok
    path = ckpt_flag(cfg.ckpt)
    tok = Tokenizer.load(path)
    return Engine(path, tok, device=cfg.device, speculative_tokens=cfg.speculative_tokens), tok


def _evaluate_fim(cfg: EvalConfig, model=None, tok=None) -> dict:
    """Greedy hidden-line exact match by FIM and from the prefix alone (nanoseek.eval.fim)."""
    from ..data.sources import iter_documents
    from .fim import MODES, exact_match, holes

    engine, tok = _engine(cfg, model, tok)
    modes = MODES if tok.fim_ids is not None else ("prefix",)  # a tokenizer without FIM tokens: prefix only
    found = holes(iter_documents(cfg.data), cfg.n, cfg.seed)
    if not found:
        raise ValueError(f"--data {cfg.data}: no Python function with a line to hide")
    return {"task": "fim", "data": cfg.data, "seed": cfg.seed,
            **exact_match(engine, tok, found, modes, max_tokens=cfg.max_tokens)}


def eval_task(cfg: EvalConfig) -> dict:
    """pass@1 and maj@k of a checkpoint on a built-in task, with pinned sampling (or, with --bpb,
    its bits per byte on held-out text: nanoseek.eval.bpb)."""
    from .bpb import eval_bpb

    res = eval_bpb(cfg) if cfg.bpb is not None else evaluate_task(cfg)
    print(json.dumps(res, indent=2))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(res, indent=2) + "\n")
    return res
