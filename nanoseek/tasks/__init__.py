"""Verifiable tasks: problems with checkable answers, their worked solutions, and the texts
built from them (pretraining corpus, cold-start SFT chats, the R1-Zero prompt).

Where the answer lives in a completion is fixed once, in `base` (read its docstring);
`rewards` scores completions against it.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Iterator

from ..data import stdlib
from .arithmetic import ArithmeticTask, corpus_documents, parse_pretrain_answer, pretrain_prompt
from .base import Problem, Task, extract_answer
from .countdown import CountdownTask
from .gsm8k import GSM8KTask, load_gsm8k

TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "gsm8k": GSM8KTask}
CORPORA = {"arith": corpus_documents, "stdlib": stdlib.documents}  # stdlib: nanoseek.data.stdlib


def get_task(name: str, **knobs) -> Task:
    """A task by name; parse/check work on a default instance, make() uses the knobs.

    The knobs are checked against the task's fields (name and type) first: a knob typed as text
    on a command line must be one line naming it, not a TypeError from deep inside make()."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    cls = TASKS[name]
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "name"]
    unknown = sorted(set(knobs) - set(known))
    if unknown:
        raise ValueError(f"task {name!r} has no knob(s) {unknown} (knobs: {', '.join(known)})")
    for k, v in knobs.items():
        want = _type_name(hints[k], v)
        if want:
            raise ValueError(f"task {name!r}: knob {k!r} must be {want}, got {v!r}")
    return cls(**knobs)


def _type_name(tp: Any, v: Any) -> str | None:
    """None when `v` fits the annotation `tp`, else what it should be, in words."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp):
        return None if v is None else _type_name(args[0], v)
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        return None if isinstance(v, bool) else "true or false"
    if origin is int:
        return None if isinstance(v, int) and not isinstance(v, bool) else "an integer"
    if origin is float:
        return None if isinstance(v, (int, float)) and not isinstance(v, bool) else "a number"
    if origin is str:
        return None if isinstance(v, str) else "a string"
    if origin is dict:
        ok = isinstance(v, dict) and all(isinstance(x, str) for kv in v.items() for x in kv)
        return None if ok else "an object of strings"
    return None


def task_from_flags(task: str, task_args: Any) -> Task:
    """`--task NAME --task-args JSON` → the task, or one line naming the flag that is wrong."""
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: unknown task; choose one of {', '.join(TASKS)}")
    if not isinstance(task_args, dict):
        raise ValueError(f"--task-args {json.dumps(task_args)}: must be a JSON object of task knobs, "
                         'e.g. {"digits": 3}')
    try:
        return get_task(task, **task_args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--task-args {json.dumps(task_args)}: {e}") from None


def task_for(problem: Problem) -> Task:
    """The verifier for a problem (its meta['task'] names it)."""
    name = problem.meta.get("task")
    if name is None:
        raise ValueError(f"problem has no meta['task'], cannot pick its verifier: {problem.prompt[:60]!r}")
    return get_task(name)


def corpus_knobs(name: str) -> list[str]:
    """The knobs a built-in corpus takes beyond n and seed (e.g. arith: chat, tagged)."""
    import inspect

    fn = CORPORA.get(name)
    return [] if fn is None else [k for k in inspect.signature(fn).parameters if k not in ("n_docs", "seed")]


def builtin_corpus(name: str, n_docs: int | None, seed: int, **knobs: float) -> Iterator[str]:
    """Plain-text pretraining documents (n_docs=None: an endless stream), seeded.

    'arith': 4-8 worked problems per document in the format
    'Q: 37+45\\nA: 37+45: 7+5=12, 2 carry 1. 3+4: 3+4+1=8, 82. 37+45=82.\\n#### 82\\n'; with chat > 0 some documents
    are User/Assistant exchanges instead (see `arithmetic.corpus_documents`); never contains a
    test-split arithmetic problem (see `tasks.arithmetic`). Evaluate a base model with
    `pretrain_prompt(problem)` and `parse_pretrain_answer(continuation)`.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}; choose one of {sorted(CORPORA)}")
    unknown = set(knobs) - set(corpus_knobs(name))
    if unknown:
        raise ValueError(f"builtin:{name} has no parameter(s) {sorted(unknown)} "
                         f"(known: n, seed, {', '.join(corpus_knobs(name))})")
    return CORPORA[name](n_docs, seed, **knobs)


def cold_start_sft(task: Task, n: int, seed: int) -> list[dict]:
    """R1's cold start: chats whose assistant turn thinks (the worked solution) then answers.
    The assistant 'content' is the bare answer — the form `base`'s contract reads back."""
    return [
        {"messages": [
            {"role": "user", "content": p.prompt},
            {"role": "assistant", "reasoning_content": p.solution, "content": p.answer},
        ]}
        for p in task.make(n, seed, split="train")
    ]


R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant "
    "solves it. The Assistant first thinks through the reasoning, then gives the answer. The "
    "reasoning is enclosed in <think> </think> tags and the answer in <answer> </answer> tags, "
    "i.e. <think> reasoning here </think> <answer> answer here </answer>.\n"
    "User: {prompt}\nAssistant:"
)


def r1_zero_prompt(problem: Problem, open_think: bool = False) -> str:
    """The R1-Zero base-model prompt. open_think=True ends it with ' <think>' (then score with
    format_reward(..., think_preopened=True), or the format reward can never fire)."""
    return R1_ZERO_TEMPLATE.format(prompt=problem.prompt) + (" <think>" if open_think else "")


__all__ = [
    "Problem", "Task", "ArithmeticTask", "CountdownTask", "GSM8KTask", "load_gsm8k",
    "TASKS", "get_task", "task_from_flags", "task_for", "builtin_corpus", "corpus_knobs", "cold_start_sft", "r1_zero_prompt",
    "pretrain_prompt", "parse_pretrain_answer", "extract_answer",
]
