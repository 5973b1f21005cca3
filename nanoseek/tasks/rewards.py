"""Rule-based rewards for GRPO (R1 used rules only: accuracy + format, no reward model).

Signature, as in TRL: `fn(completions: list[str], problems: list[Problem], **kw) -> list[float]`.
Completions are the generated text only (not the prompt), decoded with special tokens kept.

Why the format check is strict: a lenient one is the first thing RL learns to hack — empty
`<think></think>`, the tags repeated, the answer hidden in the thought, chatter after the
answer. Each of those scores 0 here (tests/test_rewards.py has one case per hack).
"""
from __future__ import annotations

import importlib
import re
from typing import Callable

from .base import (ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, Problem,
                   generated_text)

RewardFn = Callable[..., list]
_ANSWER_ONLY = re.compile(re.escape(ANSWER_OPEN) + r"(.*)" + re.escape(ANSWER_CLOSE), re.S)


def accuracy_reward(completions: list[str], problems: list[Problem], think_preopened: bool = False,
                    task=None, **kw) -> list[float]:
    """1.0 when the answer read by the contract in `tasks.base` is verified correct, else 0.0.
    The verifier is `task`, or the task each problem's meta['task'] names."""
    from . import task_for  # late import: tasks/__init__ imports this package's modules

    _same_length(completions, problems)
    out = []
    for c, p in zip(completions, problems):
        t = task or task_for(p)
        out.append(float(t.check(t.parse(c, think_preopened=think_preopened), p)))
    return out


def well_formed(completion: str, think_preopened: bool = False, answer_tags: bool | None = None) -> bool:
    """The strict format: `<think>` non-empty reasoning `</think>` then a non-empty answer and
    nothing after it (whitespace, <|eos|> and <|pad|> aside).

    think_preopened: the prompt already ended with `<think>`, so the completion starts inside
    the thought: it must hold exactly one `</think>` and no `<think>`.
    answer_tags: True → the answer must be one `<answer>…</answer>` block (R1-Zero); False →
    the bare answer (chat mode); None → either.
    """
    text = generated_text(completion)
    if think_preopened:
        if THINK_OPEN in text or text.count(THINK_CLOSE) != 1:
            return False
        reasoning, answer = text.split(THINK_CLOSE)
    else:
        if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
            return False
        before, rest = text.split(THINK_OPEN)
        if before.strip() or THINK_CLOSE not in rest:
            return False
        reasoning, answer = rest.split(THINK_CLOSE)
    if not reasoning.strip() or ANSWER_OPEN in reasoning or ANSWER_CLOSE in reasoning:
        return False
    return _answer_ok(answer.strip(), answer_tags)


def _answer_ok(answer: str, answer_tags: bool | None) -> bool:
    if not answer or "<|" in answer:  # empty, or a stray special token (<|user|>, ...)
        return False
    tagged = ANSWER_OPEN in answer or ANSWER_CLOSE in answer
    if answer_tags is not None and tagged != answer_tags:
        return False
    if not tagged:
        return True
    m = _ANSWER_ONLY.fullmatch(answer)  # the block must be the whole answer: nothing after it
    if not m:
        return False
    inner = m.group(1)
    return bool(inner.strip()) and ANSWER_OPEN not in inner and ANSWER_CLOSE not in inner


def format_reward(completions: list[str], problems: list[Problem] | None = None,
                  think_preopened: bool = False, answer_tags: bool | None = None, **kw) -> list[float]:
    """1.0 for a well-formed completion (see `well_formed`), else 0.0. Given the problems, the
    answer must also be in its task's form (one number, one expression): that is how bare-answer
    chat mode tells '82' from '82 and some chatter'. Right or wrong is accuracy's business."""
    from . import task_for

    out = []
    for i, c in enumerate(completions):
        ok = well_formed(c, think_preopened, answer_tags)
        if ok and problems is not None:
            ok = task_for(problems[i]).parse(c, think_preopened=think_preopened) is not None
        out.append(float(ok))
    return out


BUILTIN = {"accuracy": accuracy_reward, "format": format_reward}


def weighted(rewards: dict[str, tuple[RewardFn, float]]):
    """Combine named rewards: total_i = Σ_k w_k · r_k,i.

    Returns `combined(completions, problems, **kw) -> (total, components)` where components
    maps each name to its *unweighted* values (what TRL logs as rewards/<name>); a component
    may return None for "does not apply", which adds nothing to the total."""
    if not rewards:
        raise ValueError("weighted() needs at least one reward")

    def combined(completions: list[str], problems: list[Problem], **kw):
        total = [0.0] * len(completions)
        components: dict[str, list] = {}
        for name, (fn, w) in rewards.items():
            vals = fn(completions, problems, **kw)
            if len(vals) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(vals)} values for "
                                 f"{len(completions)} completions")
            components[name] = list(vals)
            for i, v in enumerate(vals):
                if v is not None:
                    total[i] += w * float(v)
        return total, components

    return combined


def load_reward(spec: str) -> RewardFn:
    """A reward by name ('accuracy', 'format') or import path 'pkg.module:function'."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"reward {spec!r}: expected one of {sorted(BUILTIN)} or 'pkg.module:function'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportError(f"reward {spec!r}: cannot import module {mod_name!r} ({e})") from e
    fn = getattr(mod, attr, None)
    if fn is None:
        raise AttributeError(f"reward {spec!r}: module {mod_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise TypeError(f"reward {spec!r}: {attr!r} is not callable")
    return fn


def _same_length(completions: list, problems: list) -> None:
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completions but {len(problems)} problems; "
                         "repeat each problem once per generation")
