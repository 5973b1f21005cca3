"""Fill-in-the-middle data: DeepSeek-Coder's FIM transform of training documents.

A model learns to fill a hole only if it has seen documents cut into prefix, middle and suffix
and rearranged so that the middle comes last: left to right, it then predicts the middle with
both sides in its context. ``--fim-rate`` of the documents are rearranged (DeepSeek-Coder: 0.5;
0 keeps plain next-token data, right for prose), the rest stay as they are, so the model still
completes left to right. Of the FIM documents, ``--fim-spm-rate`` are in SPM order (suffix,
then prefix + middle) and the rest in PSM order (``Tokenizer.fim_prompt`` builds both).

A document longer than ``--fim-max-chars`` is first cut, at line breaks, into pieces of at most
that many characters, and each piece is rearranged or not on its own: DeepSeek-Coder rearranges
whole files in a 16K context, but in a window of a few hundred tokens a hole far from its
prefix and suffix teaches nothing. A rearranged piece ends with ``<|eos|>`` (the middle's end, as a
whole FIM document's is); plain pieces run on into their neighbours.

The cut is at the character level (two uniform cut points: the hole can start and end
mid-token, as a cursor in an editor does) or at the line level (the middle is whole lines, as
the hidden-line metric of ``nanoseek.eval.fim`` asks for).

Whether and how a document is cut depends only on the seed and the document's text, never on
its position in the stream or on which worker tokenizes it, so a corpus prepares the same way
with any number of workers.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

LEVELS = ("char", "line")


@dataclass(frozen=True)
class FIMOptions:
    rate: float = 0.0  # share of documents rearranged
    spm_rate: float = 0.5  # share of those in SPM order
    level: str = "char"  # char | line
    max_chars: int = 0  # longer documents are cut into pieces first; 0 = never
    seed: int = 0

    def check(self, tok=None, where: str = "") -> None:
        """One line naming the flag: bad values, or a rate > 0 with a tokenizer that has no FIM tokens."""
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"--fim-rate {self.rate}: must be in [0, 1]")
        if not 0.0 <= self.spm_rate <= 1.0:
            raise ValueError(f"--fim-spm-rate {self.spm_rate}: must be in [0, 1]")
        if self.max_chars < 0:
            raise ValueError(f"--fim-max-chars {self.max_chars}: must be ≥ 0 (0 = whole documents)")
        if self.level not in LEVELS:
            raise ValueError(f"--fim-level {self.level!r}: expected one of {', '.join(LEVELS)}")
        if self.rate > 0 and tok is not None and tok.fim_ids is None:
            raise ValueError(f"--fim-rate {self.rate}: the tokenizer {where} has no FIM tokens (train one with "
                             "`nanoseek tokenizer train`)")


def split(text: str, rng: random.Random, level: str) -> tuple[str, str, str]:
    """(prefix, middle, suffix) with prefix + middle + suffix == text; the middle may be empty."""
    if level == "line":
        lines = text.splitlines(keepends=True)
        a, b = sorted(rng.randint(0, len(lines)) for _ in range(2))
        return "".join(lines[:a]), "".join(lines[a:b]), "".join(lines[b:])
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return text[:a], text[a:b], text[b:]


def pieces(text: str, max_chars: int) -> list[str]:
    """``text`` cut at line breaks into runs of at most ``max_chars`` characters (a longer line is
    a piece of its own); 0 = the whole text."""
    if not max_chars or len(text) <= max_chars:
        return [text]
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        if cur and len(cur) + len(line) > max_chars:
            out.append(cur)
            cur = ""
        cur += line
    return out + [cur] if cur else out


def _rng(text: str, seed: int) -> random.Random:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=str(seed).encode()).digest()
    return random.Random(int.from_bytes(digest, "little"))


def encode_documents(tok, texts: list[str], opts: FIMOptions) -> list[list[int]]:
    """Token ids of each document, ``opts.rate`` of them FIM-rearranged. Text is plain text (a
    literal "<|eos|>" or FIM tag in a document is data, never a control id)."""
    if opts.rate <= 0:
        return tok.encode_batch(texts, allow_special=False)
    return [_encode_one(tok, text, opts) for text in texts]


def _encode_one(tok, text: str, opts: FIMOptions) -> list[int]:
    rng = _rng(text, opts.seed)
    ids: list[int] = []
    plain = ""  # consecutive plain pieces are encoded as one text
    for piece in pieces(text, opts.max_chars):
        if not piece or rng.random() >= opts.rate:
            plain += piece
            continue
        if plain:
            ids += tok.encode(plain, allow_special=False)
            plain = ""
        if ids and ids[-1] != tok.eos_id:
            ids.append(tok.eos_id)  # a FIM piece starts a document of its own …
        prefix, middle, suffix = split(piece, rng, opts.level)
        ids += tok.fim_prompt(prefix, suffix, spm=rng.random() < opts.spm_rate)
        ids += tok.encode(middle, allow_special=False) + [tok.eos_id]  # … and its middle ends with <|eos|>
    if plain:
        ids += tok.encode(plain, allow_special=False)
    elif ids:
        ids.pop()  # the shard writer closes every document with <|eos|>
    return ids
