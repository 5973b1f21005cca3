"""Task-accuracy metrics over sampled answers.

pass@1 is the plain mean of correctness; with n samples per problem it averages over the n,
which is a lower-variance estimate than one sample. pass@k uses the unbiased estimator of
Chen et al. (2021, "Evaluating Large Language Models Trained on Code", eq. 1) rather than
"any of the first k", which is biased and noisy. maj@k is self-consistency (Wang et al.
2022): the most common answer among k samples, as the R1 paper reports cons@64.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of that problem's samples that are correct."""
    if not correct or any(len(c) == 0 for c in correct):
        raise ValueError("pass_at_1 needs at least one sample for every problem")
    return sum(sum(map(bool, c)) / len(c) for c in correct) / len(correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased P(at least one of k samples is correct) from n samples, c of them correct:
    1 − C(n−c, k) / C(n, k)  (Chen et al. 2021, eq. 1), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):  # C(n−c,k)/C(n,k) = Π_{i=n−c+1}^{n} (1 − k/i)
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority(answers: Sequence[str | None]) -> str | None:
    """Most common non-None answer; a tie goes to the one seen first; None if none parsed."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == top)


def maj_at_k(answers: Sequence[Sequence[str | None]], truths: Sequence[str],
             equal: Callable[[str, str], bool] | None = None) -> float:
    """Fraction of problems whose majority answer (over its k samples) is the truth.
    Pass already-normalised answers (task.parse does that); `equal` overrides '=='."""
    if len(answers) != len(truths):
        raise ValueError(f"{len(answers)} answer lists but {len(truths)} truths")
    if not truths:
        raise ValueError("maj_at_k needs at least one problem")
    eq = equal or (lambda a, b: a == b)
    hits = 0
    for ans, truth in zip(answers, truths):
        m = majority(ans)
        hits += m is not None and eq(m, truth)
    return hits / len(truths)
