"""Verifiable tasks: problems with checkable answers, their worked solutions, and the texts
built from them (pretraining corpus, cold-start SFT chats, the R1-Zero prompt).

Where the answer lives in a completion is fixed once, in `base` (read its docstring);
`rewards` scores completions against it.
"""
from __future__ import annotations

from typing import Iterator

from .arithmetic import ArithmeticTask, corpus_documents, parse_pretrain_answer, pretrain_prompt
from .base import Problem, Task, extract_answer
from .countdown import CountdownTask
from .gsm8k import GSM8KTask, load_gsm8k

TASKS = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "gsm8k": GSM8KTask}
CORPORA = {"arith": corpus_documents}


def get_task(name: str, **knobs) -> Task:
    """A task by name; parse/check work on a default instance, make() uses the knobs."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**knobs)


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
    "TASKS", "get_task", "task_for", "builtin_corpus", "corpus_knobs", "cold_start_sft", "r1_zero_prompt",
    "pretrain_prompt", "parse_pretrain_answer", "extract_answer",
]
