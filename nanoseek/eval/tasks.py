"""Task accuracy of a checkpoint: `nanoseek eval --ckpt DIR --task arithmetic [--k 8]`.

pass@1 and maj@k over held-out (test-split) problems with *pinned* sampling: the temperature
and a seed per (problem, sample) are fixed, so two runs of the same checkpoint give the same
number and two checkpoints are compared on the same draws. k samples per problem; pass@1 is
the mean correctness over all k (lower variance than one sample), maj@k the majority answer.
temperature 0 is greedy (then k is forced to 1: all samples would be identical).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import maj_at_k, pass_at_1, pass_at_k


@dataclass
class EvalConfig:
    ckpt: str = field(metadata={"help": "checkpoint directory (or a run directory with model/)"})
    task: str = field(metadata={"help": "arithmetic | countdown | gsm8k"})
    task_args: dict = field(default_factory=dict, metadata={"help": 'task knobs as JSON, e.g. {"digits": 3}'})
    template: str = field(default="chat", metadata={"choices": ["chat", "r1-zero"]})
    n: int = field(default=200, metadata={"help": "held-out problems"})
    k: int = field(default=8, metadata={"help": "samples per problem (maj@k, pass@k)"})
    temperature: float = field(default=0.7, metadata={"help": "pinned sampling temperature (0: greedy, k=1)"})
    top_p: float = 1.0
    seed: int = field(default=1234, metadata={"help": "pins the problems and every sample's seed"})
    max_tokens: int = 128
    out: str | None = field(default=None, metadata={"help": "write the result JSON here"})


def evaluate_task(cfg: EvalConfig, model=None, tok=None) -> dict:
    """Score a checkpoint (or a live model + tokenizer) on held-out problems."""
    from ..engine import Engine, SamplingParams
    from ..tasks import get_task
    from ..tasks.rewards import format_reward
    from ..tokenizer import Tokenizer
    from ..train.grpo import build_prompt, reward_kwargs
    from ..train.rundir import resolve_ckpt

    if model is None:
        path = resolve_ckpt(cfg.ckpt)
        tok = Tokenizer.load(path)
        engine = Engine(path, tok)
    else:
        engine = Engine(model, tok)
    task = get_task(cfg.task, **cfg.task_args)
    problems = task.make(cfg.n, cfg.seed, split="test")
    k = 1 if cfg.temperature <= 0 else cfg.k
    prompts, params = [], []
    for i, p in enumerate(problems):
        ids = build_prompt(p, tok, cfg.template)
        for j in range(k):
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                         top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + i * 1009 + j))
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


def eval_task(cfg: EvalConfig) -> dict:
    """pass@1 and maj@k of a checkpoint on a built-in task, with pinned sampling."""
    res = evaluate_task(cfg)
    print(json.dumps(res, indent=2))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(res, indent=2) + "\n")
    return res
