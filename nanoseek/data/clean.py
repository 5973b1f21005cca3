"""Text normalisation and heuristic quality filters.

Each filter is a named rule ``text -> bool`` (True = keep). The curation step
applies them in a fixed order and charges a rejected document to the FIRST
rule it fails, so the report's per-rule counts add up to the documents removed.

The thresholds follow the spirit of the Gopher / RefinedWeb heuristics, but are
tuned for nanoseek's corpora, which include arithmetic and countdown tasks:

* ``alpha_ratio`` counts letters AND digits ("12+34=46" is good text here);
* ``symbol_ratio`` counts *words* with no letter or digit, so an expression
  like "(3+5)*7" (one word, with digits) is fine but "#### @@@ !!!" is not.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

_WS = re.compile(r"[ \t\f\v]+")
NORMAL_FORMS = ("NFC", "NFKC", "none")


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode-normalise and tidy whitespace so equal texts compare equal.

    NFC only composes characters (é == e + U+0301); NFKC also folds
    compatibility forms (full-width digits, ligatures) and is the stronger
    choice for web text. Line endings become "\\n", trailing spaces on lines and
    surrounding blank lines go.
    """
    if form not in NORMAL_FORMS:
        raise ValueError(f"normalize form must be one of {NORMAL_FORMS}, got {form!r}")
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def dedup_key(text: str) -> str:
    """The text an exact-duplicate check compares: case and spacing folded."""
    return " ".join(text.lower().split())


@dataclass
class QualityConfig:
    """Thresholds of the quality filters; None switches a rule off."""

    min_chars: int | None = 20
    max_chars: int | None = 200_000
    min_alpha_ratio: float | None = 0.4  # letters+digits / non-space chars
    max_symbol_ratio: float | None = 0.3  # words without any letter/digit / words
    max_dup_line_fraction: float | None = 0.3  # repeated lines / lines (>= 3 lines)
    max_dup_ngram_fraction: float | None = 0.3  # repeated word n-grams / n-grams
    ngram: int = 3
    min_words_for_ngram: int = 12  # short texts are too short to judge repetition


def alpha_ratio(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalnum() for c in chars) / len(chars) if chars else 0.0


def symbol_ratio(text: str) -> float:
    words = text.split()
    if not words:
        return 1.0
    return sum(not any(c.isalnum() for c in w) for w in words) / len(words)


def dup_line_fraction(text: str) -> float:
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if len(lines) < 3:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def dup_ngram_fraction(text: str, n: int = 3, min_words: int = 12) -> float:
    """Fraction of word n-grams that already occurred earlier in the text."""
    words = text.lower().split()
    if len(words) < max(min_words, n):
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams)


Rule = tuple[str, Callable[[str], bool]]


def build_rules(cfg: QualityConfig) -> list[Rule]:
    """The enabled rules, in the order they are checked."""
    rules: list[Rule] = []
    if cfg.min_chars is not None:
        rules.append(("too_short", lambda t: len(t) >= cfg.min_chars))
    if cfg.max_chars is not None:
        rules.append(("too_long", lambda t: len(t) <= cfg.max_chars))
    if cfg.max_symbol_ratio is not None:
        rules.append(("symbol_ratio", lambda t: symbol_ratio(t) <= cfg.max_symbol_ratio))
    if cfg.min_alpha_ratio is not None:
        rules.append(("alpha_ratio", lambda t: alpha_ratio(t) >= cfg.min_alpha_ratio))
    if cfg.max_dup_line_fraction is not None:
        rules.append(("repeated_lines", lambda t: dup_line_fraction(t) <= cfg.max_dup_line_fraction))
    if cfg.max_dup_ngram_fraction is not None:
        rules.append(("repeated_ngrams",
                      lambda t: dup_ngram_fraction(t, cfg.ngram, cfg.min_words_for_ngram) <= cfg.max_dup_ngram_fraction))
    return rules


def first_failed_rule(text: str, rules: list[Rule]) -> str | None:
    """Name of the first rule ``text`` fails, or None if it passes them all."""
    for name, keep in rules:
        if not keep(text):
            return name
    return None
