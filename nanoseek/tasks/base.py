"""The shape every verifiable task shares: a `Problem`, a `Task`, and the answer contract.

Why one contract: SFT data, the GRPO rewards and the eval all have to agree on *where* the
final answer lives in a completion, or a model that answers correctly scores zero.

The answer contract (chat mode and R1-Zero mode alike):

1. Generation ends at the first ``<|eos|>``; anything after it, and trailing ``<|pad|>``,
   is ignored.
2. If the completion has a ``</think>``, the *answer region* is the text after the last one
   (nothing inside the thought counts as an answer). If the thought was opened but never
   closed, or the prompt template pre-opened ``<think>`` (``think_preopened=True``) and the
   completion never closes it, there is no answer.  A completion with no think tags at all
   is all answer region (a model asked without a thought may still answer).
3. Inside the answer region, if ``<answer>`` tags appear (R1-Zero template) the answer is the
   text of the single ``<answer>…</answer>`` block; two or more blocks is hedging and gives no
   answer. Otherwise the whole region, stripped, is the answer.
4. Each task then normalises that text strictly (e.g. arithmetic wants exactly one integer),
   so "81 or 82" is not read as 82.

Chat mode renders the assistant turn as ``<think>\\n{reasoning}\\n</think>\\n{answer}``: for
arithmetic and GSM8K the answer is the bare number, for countdown the bare expression.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

EOS, PAD = "<|eos|>", "<|pad|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# A problem is held out (test split only) when the hash of its canonical key falls in the
# first HELDOUT_PER_MILLE of 1000 buckets. Train split, pretraining corpus and SFT data all
# reject held-out keys, so no test problem can leak into training whatever the seeds.
HELDOUT_PER_MILLE = 100


@dataclass(frozen=True)
class Problem:
    """One verifiable question.

    prompt:   the user's question (chat mode); templates wrap it for other modes.
    answer:   the canonical final answer, as a string.
    solution: a worked, step-by-step trace — the ``<think>`` content for cold-start SFT.
    meta:     task-specific facts the verifier needs (``meta["task"]`` names the task).
    """

    prompt: str
    answer: str
    solution: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@runtime_checkable
class Task(Protocol):
    """What GRPO, SFT and eval need from a task."""

    name: str

    def make(self, n: int, seed: int, split: str = "train") -> list[Problem]: ...

    def parse(self, completion: str, think_preopened: bool = False) -> str | None: ...

    def check(self, pred: str | None, problem: Problem) -> bool: ...


def heldout(key: str) -> bool:
    """Is this canonical problem key in the held-out (test) bucket? Stable across runs/machines."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h % 1000 < HELDOUT_PER_MILLE


def in_split(key: str, split: str) -> bool:
    """Train and test are disjoint by construction: test ⇔ held-out bucket."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return heldout(key) == (split == "test")


def generated_text(completion: str) -> str:
    """Rule 1: the completion up to its first <|eos|>, trailing <|pad|> and whitespace removed."""
    text = completion.split(EOS, 1)[0].rstrip()
    while text.endswith(PAD):
        text = text[: -len(PAD)].rstrip()
    return text


def answer_region(completion: str, think_preopened: bool = False) -> str | None:
    """Rules 1-2 of the contract: the text where an answer may live, or None."""
    text = generated_text(completion)
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if think_preopened or THINK_OPEN in text:
        return None  # still thinking: no answer yet
    return text


_ANSWER_BLOCK = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.S)


def extract_answer(completion: str, think_preopened: bool = False) -> str | None:
    """Rules 1-3 of the contract: the raw answer text (stripped), or None."""
    region = answer_region(completion, think_preopened)
    if region is None:
        return None
    if ANSWER_OPEN in region or ANSWER_CLOSE in region:
        blocks = _ANSWER_BLOCK.findall(region)
        if len(blocks) != 1:
            return None
        region = blocks[0]
    region = region.strip()
    return region or None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalize_number(text: str | None) -> str | None:
    """'$1,234.00' → '1234', ' -7. ' → '-7'; anything that is not exactly one number → None."""
    if text is None:
        return None
    t = text.strip().replace(",", "").replace("$", "").strip()
    if t.endswith("."):  # a sentence-final period, "42."
        t = t[:-1]
    if not _NUMBER.fullmatch(t):
        return None
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    if t in ("-0", ""):
        t = "0"
    return t
