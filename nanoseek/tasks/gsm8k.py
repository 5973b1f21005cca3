"""GSM8K-style word problems from jsonl: {"question": ..., "answer": "...steps...\\n#### 72"}.

Why a loader and no data: the project is hermetic (nothing downloaded); point it at the real
GSM8K files, or at any jsonl in the same shape, and it becomes a verifiable task.
The worked solution is the text before '####' with the calculator annotations `<<48/2=24>>`
removed; the answer is the number after it, normalised ('$1,200' → '1200').
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .base import Problem, extract_answer, in_split, normalize_number

NAME = "gsm8k"
_CALC = re.compile(r"<<[^>]*>>")


def parse_record(rec: dict, where: str = "record") -> Problem:
    """One jsonl record → Problem; a clear error names `where` (file:line) when it is malformed."""
    for k in ("question", "answer"):
        if not isinstance(rec.get(k), str):
            raise ValueError(f"{where}: field {k!r} is missing or not a string")
    if "####" not in rec["answer"]:
        raise ValueError(f"{where}: field 'answer' has no '#### <number>' final line")
    steps, final = rec["answer"].rsplit("####", 1)
    answer = normalize_number(final)
    if answer is None:
        raise ValueError(f"{where}: final answer {final.strip()!r} after '####' is not a number")
    question = rec["question"].strip()
    return Problem(prompt=question, answer=answer, solution=_CALC.sub("", steps).strip(),
                   meta={"task": NAME, "key": question})


def load_gsm8k(path: str | Path) -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gsm8k: no such file {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object")
            out.append(parse_record(rec, f"{path}:{i}"))
    return out


@dataclass
class GSM8KTask:
    """`paths` maps a split to its file (the real GSM8K ships train.jsonl and test.jsonl).
    Given a single `path` instead, the split is made by hashing each question, so train and
    test never share a question. parse/check need no file."""

    path: str | None = None
    paths: dict[str, str] = field(default_factory=dict)
    name: str = NAME

    def make(self, n: int | None, seed: int, split: str = "train") -> list[Problem]:
        """Up to n problems (all if n is None), a seeded shuffle of the split."""
        in_split("", split)
        if split in self.paths:
            probs = load_gsm8k(self.paths[split])
        elif self.path is not None:
            probs = [p for p in load_gsm8k(self.path) if in_split(p.meta["key"], split)]
        else:
            raise ValueError(f"gsm8k: no file for split {split!r}; give path= or paths={{'{split}': ...}}")
        random.Random(f"{NAME}:{seed}:{split}").shuffle(probs)
        return probs if n is None else probs[:n]

    def parse(self, completion: str, think_preopened: bool = False) -> str | None:
        return normalize_number(extract_answer(completion, think_preopened))

    def check(self, pred: str | None, problem: Problem) -> bool:
        return pred is not None and normalize_number(pred) == problem.answer
