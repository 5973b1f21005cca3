"""Countdown: reach a target from given numbers with + - * / (the TinyZero-style R1 task).

Why this task: the answer is an expression, so there are many right answers and the reward
must *verify* rather than compare strings. The verifier parses with `ast` and walks only
integer literals, + - * / and parentheses, computing in exact `Fraction`s; nothing is ever
`eval`-ed, so a completion cannot run code.

The generator builds the target from a random expression over a subset of the numbers, so
every problem is solvable; the solution trace is that expression's steps, innermost first.
"""
from __future__ import annotations

import ast
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from .base import Problem, extract_answer, in_split

NAME = "countdown"
MAX_EXPR_CHARS = 200  # a real answer is short; refuse pathological input before parsing

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


def safe_eval(expr: str) -> tuple[Fraction, list[int]] | None:
    """Value and literals of an expression of integers, + - * / and parentheses; None if the
    text is anything else (names, calls, unary minus, floats, ...) or divides by zero."""
    if len(expr) > MAX_EXPR_CHARS:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            a, b = walk(node.left), walk(node.right)
            if a is None or b is None:
                return None
            return _apply(a, _AST_OPS[type(node.op)], b)
        return None

    value = walk(tree.body)
    return None if value is None else (value, literals)


def verify(expr: str | None, numbers: list[int], target: int) -> bool:
    """True iff expr is a safe expression, uses each given number at most once, and equals target."""
    if not expr:
        return False
    got = safe_eval(expr)
    if got is None:
        return False
    value, literals = got
    if Counter(literals) - Counter(numbers):  # some literal used more often than given
        return False
    return value == target


def _render(tree) -> str:
    """Infix with the fewest parentheses: a child needs them when it binds looser than its
    parent, or, as the right operand of - or /, when it binds equally."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree

    def sub(child, is_right: bool) -> str:
        s = _render(child)
        if isinstance(child, int):
            return s
        cp, pp = _PREC[child[0]], _PREC[op]
        if cp < pp or (is_right and cp == pp and op in "-/"):
            return f"({s})"
        return s

    return f"{sub(left, False)}{op}{sub(right, True)}"


def _value(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, l, r = tree
    return int(_apply(Fraction(_value(l)), op, Fraction(_value(r))))


def _combine(rng: random.Random, a, b):
    """Combine two subtrees with a random op keeping every intermediate a positive integer."""
    va, vb = _value(a), _value(b)
    choices = [("+", a, b), ("*", a, b)]
    if va != vb:
        choices.append(("-", a, b) if va > vb else ("-", b, a))
    if vb > 1 and va % vb == 0:
        choices.append(("/", a, b))
    if va > 1 and vb % va == 0:
        choices.append(("/", b, a))
    return rng.choice(choices)


def _steps(tree, out: list[str]) -> None:
    if isinstance(tree, int):
        return
    op, l, r = tree
    _steps(l, out)
    _steps(r, out)
    out.append(f"{_value(l)}{op}{_value(r)}={_value(tree)}")


def make_problem(numbers: list[int], tree) -> Problem:
    target = _value(tree)
    expr = _render(tree)
    lines: list[str] = []
    _steps(tree, lines)
    solution = f"Target {target} from {numbers}. " + ". ".join(lines) + f". So {expr}={target}."
    shown = ", ".join(map(str, numbers))
    return Problem(
        prompt=f"Using the numbers {shown}, make {target}. Use + - * / and parentheses; "
               "each number at most once.",
        answer=expr,
        solution=solution,
        meta={"task": NAME, "numbers": list(numbers), "target": target,
              "key": f"{sorted(numbers)}->{target}"},
    )


@dataclass
class CountdownTask:
    """Knobs: how many numbers are given, their range, and the largest allowed target."""

    n_numbers: int = 4
    max_number: int = 25
    max_target: int = 999
    name: str = NAME

    def sample(self, rng: random.Random) -> Problem | None:
        numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
        used = rng.sample(numbers, rng.randint(2, self.n_numbers))
        trees: list = list(used)
        while len(trees) > 1:  # random binary tree: merge two random subtrees
            i, j = sorted(rng.sample(range(len(trees)), 2))
            b, a = trees.pop(j), trees.pop(i)
            trees.append(_combine(rng, a, b))
        target = _value(trees[0])
        if target in numbers or not 1 <= target <= self.max_target:
            return None  # trivial or too big
        return make_problem(numbers, trees[0])

    def make(self, n: int, seed: int, split: str = "train") -> list[Problem]:
        """n distinct (numbers, target) problems; train/test split by the hash of that key."""
        in_split("", split)
        rng = random.Random(f"{NAME}:{seed}:{split}")
        seen: dict[str, Problem] = {}
        for _ in range(200 * n + 10_000):
            if len(seen) == n:
                break
            p = self.sample(rng)
            if p is not None and p.meta["key"] not in seen and in_split(p.meta["key"], split):
                seen[p.meta["key"]] = p
        if len(seen) < n:
            raise ValueError(f"countdown: found only {len(seen)} distinct {split!r} problems, "
                             f"asked for {n}; raise n_numbers or max_number")
        return list(seen.values())

    def parse(self, completion: str, think_preopened: bool = False) -> str | None:
        """The expression (a trailing '= target' is allowed and dropped); None unless it is a
        well-formed expression of integers and + - * / ( )."""
        text = extract_answer(completion, think_preopened)
        if text is None:
            return None
        expr = text.split("=", 1)[0].strip()
        return expr if safe_eval(expr) is not None else None

    def check(self, pred: str | None, problem: Problem) -> bool:
        return verify(pred, problem.meta["numbers"], problem.meta["target"])
