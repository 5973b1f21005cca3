"""Integer arithmetic with worked, column-by-column solutions.

Why column traces: a 1-5M parameter model cannot add 37+45 "in its head", but it can learn
the school algorithm one digit at a time if every step is written out, right to left:

    37+45   →  37+45: 7+5=12, 2 carry 1. 3+4: 3+4+1=8, 82. 37+45=82.
    52-17   →  2-7+10=5 borrow 1. 5-1-1=3. 52-17=35.
    37*4    →  7*4=28 carry 2. 3*4+2=14 carry 1. 37*4=148.

Addition restates what is left of the operands before each column and carries the answer so
far along (`add_trace` says why). Each line ends by restating the whole step (`37+45=82.`),
so a chain like 12+34*5 reads as one line per binary step (multiplication first, then + and -
left to right).

Held-out split: every binary step a trace states (not the single-digit column facts, which
are the algorithm's alphabet) has a canonical key (`37+45`, operands sorted for + and *).
Test problems are those whose own key is held out (see `base.heldout`); train problems and
the pretraining corpus reject any problem whose key *or any step key* is held out, so a test
question never appears, even as a step of a longer one.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from .base import Problem, extract_answer, heldout, in_split, normalize_number

NAME = "arithmetic"


def _rdigits(n: int, width: int) -> list[int]:
    """Digits least-significant first, zero-padded to `width`."""
    d = [int(c) for c in reversed(str(n))]
    return d + [0] * (width - len(d))


def step_key(a: int, op: str, b: int) -> str:
    if op in "+*":
        a, b = min(a, b), max(a, b)
    return f"{a}{op}{b}"


def add_trace(a: int, b: int) -> str:
    """Column addition, right to left, written so that every digit the next token needs sits
    at the end of something just written:

        904+399: 4+9=13, 3 carry 1. 90+39: 0+9+1=10, 03 carry 1. 9+3: 9+3+1=13, 1303. 904+399=1303.

    Each column starts by restating what is left of the operands (an exhausted one is 0), so
    the column's digits are the last digits of the two numbers just written; it ends with the
    answer so far (this column's digit in front of the previous answer), so the result is a
    copy, not a re-assembly of digits scattered over the trace. A small model learns local
    copies reliably; reading the k-th digit of an operand from the question, or the units of
    every column sum in reverse order, is a positional lookup it learns only on some
    trajectories (docs/pretraining.md, "Why the recipe holds").
    """
    if a < 10 and b < 10:
        return f"{a}+{b}={a + b}."  # a column fact needs no working
    w = max(len(str(a)), len(str(b)))
    parts, carry, so_far = [], 0, ""
    for i in range(w):
        x, y = a // 10**i, b // 10**i  # what is left of each operand
        s = x % 10 + y % 10 + carry
        last = i == w - 1
        so_far = (str(s) if last else str(s % 10)) + so_far  # the last column writes its carry too
        parts.append(f"{x}+{y}: {x % 10}+{y % 10}" + (f"+{carry}" if carry else "") + f"={s}, {so_far}"
                     + (" carry 1" if s >= 10 and not last else ""))
        carry = s // 10
    parts.append(f"{a}+{b}={a + b}")
    return ". ".join(parts) + "."


def sub_trace(a: int, b: int) -> str:
    """Column subtraction (a >= b >= 0), right to left, borrowing 10 when a column goes negative."""
    if a < b:
        raise ValueError(f"sub_trace needs a >= b, got {a}-{b}")
    if a < 10:
        return f"{a}-{b}={a - b}."
    w = len(str(a))
    parts, borrow = [], 0
    for x, y in zip(_rdigits(a, w), _rdigits(b, w)):
        d = x - y - borrow
        e = f"{x}-{y}" + (f"-{borrow}" if borrow else "")
        if d < 0:
            parts.append(f"{e}+10={d + 10} borrow 1")
            borrow = 1
        else:
            parts.append(f"{e}={d}")
            borrow = 0
    parts.append(f"{a}-{b}={a - b}")
    return ". ".join(parts) + "."


def mul_trace(a: int, b: int) -> tuple[str, list[tuple[int, str, int]]]:
    """Long multiplication. One-digit b: digit by digit with carries. Longer b: one partial
    product per non-zero digit of b, then the partials are column-added. Returns the trace and
    the binary steps it states (for the held-out check)."""
    steps: list[tuple[int, str, int]] = [(a, "*", b)]
    if a < 10 and b < 10:
        return f"{a}*{b}={a * b}.", steps
    if b < 10:
        parts, carry, w = [], 0, len(str(a))
        for i, x in enumerate(_rdigits(a, w)):
            p = x * b + carry
            parts.append(f"{x}*{b}" + (f"+{carry}" if carry else "") + f"={p}"
                         + (f" carry {p // 10}" if p >= 10 and i < w - 1 else ""))
            carry = p // 10
        parts.append(f"{a}*{b}={a * b}")
        return ". ".join(parts) + ".", steps
    partials = []
    for i, d in enumerate(_rdigits(b, len(str(b)))):
        if d:
            m = d * 10**i
            partials.append((m, a * m))
            steps.append((a, "*", m))
    lines = [". ".join(f"{a}*{m}={p}" for m, p in partials) + "."]
    acc = partials[0][1]
    for _, p in partials[1:]:
        lines.append(add_trace(acc, p))
        steps.append((acc, "+", p))
        acc += p
    lines.append(f"{a}*{b}={a * b}.")
    return " ".join(lines), steps


def binary_trace(a: int, op: str, b: int) -> tuple[str, list[tuple[int, str, int]]]:
    if op == "+":
        return add_trace(a, b), [(a, "+", b)]
    if op == "-":
        return sub_trace(a, b), [(a, "-", b)]
    if op == "*":
        return mul_trace(a, b)
    raise ValueError(f"unknown op {op!r}; arithmetic supports + - *")


def solve(nums: list[int], ops: list[str]) -> tuple[int, str, list[tuple[int, str, int]]] | None:
    """Evaluate with the usual precedence (* first, then + - left to right), one trace line per
    binary step. None if a step would go negative (traces only cover non-negative numbers)."""
    vals, ops = list(nums), list(ops)
    lines: list[str] = []
    steps: list[tuple[int, str, int]] = []

    def reduce(i: int) -> bool:
        a, op, b = vals[i], ops[i], vals[i + 1]
        r = a + b if op == "+" else a - b if op == "-" else a * b
        if r < 0:
            return False
        t, s = binary_trace(a, op, b)
        lines.append(t)
        steps.extend(s)
        vals[i: i + 2] = [r]
        del ops[i]
        return True

    while "*" in ops:
        if not reduce(ops.index("*")):
            return None
    while ops:
        if not reduce(0):
            return None
    return vals[0], "\n".join(lines), steps


def make_problem(nums: list[int], ops: list[str]) -> Problem | None:
    """The Problem for `nums[0] ops[0] nums[1] ...`, or None if it would go negative."""
    solved = solve(nums, ops)
    if solved is None:
        return None
    value, trace, steps = solved
    expr = str(nums[0]) + "".join(f"{o}{n}" for o, n in zip(ops, nums[1:]))
    key = step_key(nums[0], ops[0], nums[1]) if len(nums) == 2 else expr
    return Problem(
        prompt=f"What is {expr}?",
        answer=str(value),
        solution=trace,
        meta={"task": NAME, "expr": expr, "key": key,
              "step_keys": [step_key(*s) for s in steps]},
    )


def _operand(rng: random.Random, min_digits: int, digits: int) -> int:
    n = rng.randint(min_digits, digits)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)


def sample_problem(rng: random.Random, digits: int, ops: str, chain: int,
                   min_digits: int = 1, mul_digits: int | None = None) -> Problem | None:
    """One random problem. For '-' with two operands the larger comes first (no negatives).
    `mul_digits` caps the digits of a right-hand multiplication operand (keeps traces short)."""
    nums = [_operand(rng, min_digits, digits) for _ in range(chain)]
    opl = [rng.choice(ops) for _ in range(chain - 1)]
    if mul_digits is not None:
        for i, o in enumerate(opl):
            if o == "*":
                nums[i + 1] = _operand(rng, 1, mul_digits)
    if chain == 2 and opl[0] == "-" and nums[0] < nums[1]:
        nums.reverse()
    return make_problem(nums, opl)


def usable(p: Problem, split: str) -> bool:
    """Test: the problem's own key is held out. Train: neither it nor any step is."""
    if split == "test":
        return heldout(p.meta["key"])
    return in_split(p.meta["key"], "train") and not any(heldout(k) for k in p.meta["step_keys"])


@dataclass
class ArithmeticTask:
    """Knobs: operand `digits` (max, each operand draws its length in [min_digits, digits]),
    `ops` (any of "+-*"), `chain` (number of operands, >= 2)."""

    digits: int = 2
    ops: str = "+"
    chain: int = 2
    min_digits: int = 1
    name: str = NAME

    def __post_init__(self):
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {self.ops!r}")
        if self.chain < 2:
            raise ValueError(f"chain (number of operands) must be >= 2, got {self.chain}")
        if not 1 <= self.min_digits <= self.digits:
            raise ValueError(f"need 1 <= min_digits <= digits, got {self.min_digits}, {self.digits}")

    def make(self, n: int, seed: int, split: str = "train") -> list[Problem]:
        """n distinct problems, reproducible from (seed, split); train and test never overlap."""
        in_split("", split)  # validates the split name
        rng = random.Random(f"{NAME}:{seed}:{split}")
        seen: dict[str, Problem] = {}
        for _ in range(200 * n + 10_000):
            if len(seen) == n:
                break
            p = sample_problem(rng, self.digits, self.ops, self.chain, self.min_digits)
            if p is not None and p.meta["expr"] not in seen and usable(p, split):
                seen[p.meta["expr"]] = p
        if len(seen) < n:
            raise ValueError(
                f"arithmetic: found only {len(seen)} distinct {split!r} problems for digits="
                f"{self.digits}, ops={self.ops!r}, chain={self.chain}; asked for {n} — "
                "the problem space is too small, raise digits or chain")
        return list(seen.values())

    def parse(self, completion: str, think_preopened: bool = False) -> str | None:
        """Exactly one integer in the answer (see base's contract), else None."""
        v = normalize_number(extract_answer(completion, think_preopened))
        return v if v is not None and "." not in v else None

    def check(self, pred: str | None, problem: Problem) -> bool:
        return pred is not None and normalize_number(pred) == problem.answer


# ---- the plain-text pretraining corpus --------------------------------------------------

def pretrain_text(p: Problem) -> str:
    """The corpus format of one worked problem, e.g.
    'Q: 37+45\\nA: 37+45: 7+5=12, 2 carry 1. 3+4: 3+4+1=8, 82. 37+45=82.\\n#### 82\\n'."""
    return f"{pretrain_prompt(p)} {p.solution}\n#### {p.answer}\n"


def pretrain_prompt(p: Problem) -> str:
    """What the base model continues at eval: 'Q: 37+45\\nA:'."""
    return f"Q: {p.meta.get('expr', p.prompt)}\nA:"


def parse_pretrain_answer(text: str) -> str | None:
    """The number after the first '####' in a continuation (the model may ramble on)."""
    _, sep, rest = text.partition("####")
    if not sep:
        return None
    first = rest.strip().split("\n", 1)[0].split()
    return normalize_number(first[0]) if first else None


def chat_text(p: Problem, tagged: bool) -> str:
    """One 'User: … Assistant: …' exchange, a document of its own (so it ends with <|eos|>).

    Plain: the worked solution then '#### n', as in the Q/A documents. Tagged: the R1-Zero
    form, '<think> worked solution </think> <answer> n </answer>'. A few tagged exchanges in
    the corpus are what lets R1-Zero GRPO start: a base model asked with `r1_zero_prompt`
    answers in tags only as often as its data did, and the format reward grows that from
    near 0 to 1 (it cannot reward a form the model never produces).
    """
    head = f"User: {p.prompt}\nAssistant:"
    if tagged:
        return f"{head} <think> {p.solution} </think> <answer> {p.answer} </answer>"
    return f"{head} {p.solution}\n#### {p.answer}"


# The mix: mostly 1-3 digit addition — a quarter of all documents with both operands of three
# digits, the longest copies the traces make and the ones a base model gets wrong last — some
# subtraction, short multiplication, short chains.
_MIX = [  # (weight, digits, ops, chain, mul_digits, min_digits)
    (0.50, 3, "+", 2, None, 1),
    (0.25, 3, "+", 2, None, 3),
    (0.10, 3, "-", 2, None, 1),
    (0.10, 2, "*", 2, 1, 1),
    (0.05, 2, "+-", 3, None, 1),
]


def corpus_documents(n_docs: int | None, seed: int, chat: float = 0.0, tagged: float = 0.15) -> Iterator[str]:
    """Documents of 4-8 worked Q/A problems separated by a blank line; train split only.

    chat: the fraction of documents that are instead one User/Assistant exchange (`chat_text`),
    `tagged` of those in the R1-Zero tag form. The default corpus has none: the demo's base is
    judged on Q/A addition, and measured runs lost accuracy as chat documents were added
    (69% → 47.5% → 31.5% held-out for chat 0 / 0.2 / 0.3, same steps). An R1-Zero base needs
    them (`builtin:arith?chat=0.3`, see docs/reasoning.md).
    """
    if not (0.0 <= chat <= 1.0 and 0.0 <= tagged <= 1.0):
        raise ValueError(f"builtin:arith: chat and tagged are fractions in [0, 1], got chat={chat}, tagged={tagged}")
    rng = random.Random(f"arith-corpus:{seed}")
    weights = [m[0] for m in _MIX]

    def draw() -> Problem:
        while True:
            _, digits, ops, chain, mul, lo = rng.choices(_MIX, weights)[0]
            p = sample_problem(rng, digits, ops, chain, min_digits=lo, mul_digits=mul)
            if p is not None and usable(p, "train"):
                return p

    made = 0
    while n_docs is None or made < n_docs:
        if chat and rng.random() < chat:  # no draw at chat=0: the plain corpus stays as it was
            yield chat_text(draw(), tagged=rng.random() < tagged)
        else:
            yield "\n".join(pretrain_text(draw()) for _ in range(rng.randint(4, 8)))
        made += 1
