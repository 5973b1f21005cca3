"""Constrained decoding: which tokens a request may sample next, applied in the sampling step.

One mechanism serves every constraint the engine knows: JSON output (``response_format``), tool-call
arguments that must match a function's JSON schema, and token healing. A request's
``SamplingParams.constraint`` is a factory; the engine calls it once when the request is added, so
each request (each of ``n`` choices too) owns its state, a :class:`TokenConstraint`:

* ``allowed()`` → a (vocab,) bool tensor of the tokens the next step may sample, or None for any;
  the sampler sets every other logit to −inf after penalties and before temperature, top-k, top-p
  and the seeded draw, so the constrained distribution is the model's renormalised over the
  allowed tokens (greedy takes the best allowed token);
* ``advance(token)`` → called for each token the request accepts;
* ``done`` → the constrained text is complete (a grammar that can take no further byte): the request
  ends there with finish_reason "stop". A request that runs out of ``max_tokens`` first ends with
  "length" — its text is then an unfinished object, never presented as a finished one.

Reported log-probs stay the model's own (before the mask), as the API reports them without one.

Grammars are llguidance's (a maintained Rust library with CPU wheels): JSON schemas and Lark
grammars are compiled against nanoseek's byte-level BPE vocabulary, whose special tokens a grammar
can only name explicitly (``<[id]>``), never produce by accident.

Speculative decoding: a request with a constraint drafts nothing — the MTP drafts of a constrained
request would have to be masked and verified against a grammar state advanced through each draft;
instead its steps decode one token each (other requests in the batch keep speculating).
"""

from __future__ import annotations

import bisect
import json
import weakref
from typing import Callable, Protocol

import numpy as np
import torch


class TokenConstraint(Protocol):
    """One request's constraint state (see the module docstring)."""

    done: bool

    def allowed(self) -> torch.Tensor | None: ...

    def advance(self, token: int) -> None: ...


ConstraintFactory = Callable[[], TokenConstraint]


# ------------------------------------------------------------------------------ grammars
_LLG_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _llg_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of a nanoseek tokenizer (built once per tokenizer and model vocabulary:
    the model's vocabulary may be padded past the tokenizer's)."""
    import llguidance

    per = _LLG_TOKENIZERS.setdefault(tokenizer, {})
    if vocab_size not in per:
        per[vocab_size] = llguidance.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size,
                                                 eos_token=tokenizer.eos_id)
    return per[vocab_size]


def json_rule(schema: dict) -> str:
    """A Lark rule body for JSON valid under ``schema``, written compactly (``{"a": 1, "b": [2]}``
    spacing, via llguidance's ``x-guidance`` option): no free whitespace a sampler could wander into."""
    compact = {**schema, "x-guidance": {**schema.get("x-guidance", {}), "whitespace_flexible": False}}
    return "%json " + json.dumps(compact, ensure_ascii=False)


class Grammar:
    """A compiled grammar for one tokenizer; calling it starts a fresh matcher (one per request)."""

    def __init__(self, tokenizer, vocab_size: int, grammar: str):
        import llguidance

        self.llg = _llg_tokenizer(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.llg)
        if error:
            raise ValueError(f"the grammar cannot be compiled: {messages[0]}")
        self.grammar = grammar

    @classmethod
    def json_schema(cls, tokenizer, vocab_size: int, schema: dict) -> "Grammar":
        """JSON matching ``schema`` (``{"type": "object"}``: any JSON object), compact (``json_rule``)."""
        return cls.lark(tokenizer, vocab_size, "start: " + json_rule(schema))

    @classmethod
    def lark(cls, tokenizer, vocab_size: int, text: str) -> "Grammar":
        """A Lark grammar in llguidance's dialect: ``%json {schema}`` embeds a JSON schema,
        ``<[id]>`` is the special token ``id``."""
        import llguidance

        return cls(tokenizer, vocab_size, llguidance.LLMatcher.grammar_from_lark(text))

    def __call__(self) -> "GrammarState":
        return GrammarState(self)


class GrammarState:
    """An llguidance matcher over one request's generated tokens."""

    def __init__(self, grammar: Grammar):
        import llguidance
        import llguidance.torch

        self.m = llguidance.LLMatcher(grammar.llg, grammar.grammar, log_level=0)
        self.V = grammar.vocab_size
        self.words = llguidance.torch.allocate_token_bitmask(1, self.V)
        self._fill = llguidance.torch.fill_next_token_bitmask
        self.done = False

    def allowed(self) -> torch.Tensor:
        self._fill(self.m, self.words)
        if self.m.is_error():
            raise RuntimeError(f"grammar matcher: {self.m.get_error()}")
        # bit j of 32-bit word i is token 32·i + j: the words' little-endian bytes, unpacked low bit first
        bits = np.unpackbits(self.words.numpy().view(np.uint8), bitorder="little")[:self.V]
        return torch.from_numpy(bits.view(np.bool_))

    def advance(self, token: int) -> None:
        if not self.m.consume_token(int(token)):
            raise RuntimeError(f"grammar matcher rejected token {token}: {self.m.get_error()}")
        self.done = self.m.is_stopped()


# ------------------------------------------------------------------------------ token healing
class VocabIndex:
    """Token bytes, sorted, for the two questions token healing asks: which tokens begin with a
    text, and which tokens are a prefix of it. Special tokens are left out: their text is a
    name, never a piece of the prompt."""

    def __init__(self, table: list[bytes], special: frozenset[int], vocab_size: int):
        pairs = sorted((b, i) for i, b in enumerate(table) if b and i not in special and i < vocab_size)
        self.keys = [b for b, _ in pairs]
        self.ids = [i for _, i in pairs]
        self.by_bytes: dict[bytes, list[int]] = {}
        for b, i in pairs:
            self.by_bytes.setdefault(b, []).append(i)
        self.table, self.special, self.V = table, special, vocab_size

    def starting_with(self, text: bytes) -> list[int]:
        lo = bisect.bisect_left(self.keys, text)
        hi = lo
        while hi < len(self.keys) and self.keys[hi].startswith(text):
            hi += 1
        return self.ids[lo:hi]

    def prefixes_of(self, text: bytes) -> list[int]:
        """Tokens whose bytes are a proper, non-empty prefix of ``text``."""
        return [i for n in range(1, len(text)) for i in self.by_bytes.get(text[:n], ())]


class TextPrefix:
    """The generated text must begin with ``text`` (token healing: the bytes of the prompt token
    that was backed up). Each token either covers the rest of it (begins with it) or is a proper
    prefix of it, after which the remainder must follow; once covered, any token may follow."""

    def __init__(self, index: VocabIndex, text: bytes):
        self.index, self.rest, self.done = index, text, False

    def allowed(self) -> torch.Tensor | None:
        if not self.rest:
            return None
        mask = torch.zeros(self.index.V, dtype=torch.bool)
        ids = self.index.starting_with(self.rest) + self.index.prefixes_of(self.rest)
        mask[torch.tensor(ids, dtype=torch.long)] = True
        return mask

    def advance(self, token: int) -> None:
        b = self.index.table[token] if 0 <= token < len(self.index.table) else b""
        self.rest = self.rest[len(b):] if self.rest.startswith(b) else b""


def apply_masks(logits: torch.Tensor, constraints: list[TokenConstraint | None]) -> torch.Tensor:
    """Rows of logits (n, V), one constraint (or None) per row → the logits with every token a
    row's constraint forbids at −inf (a new tensor when any row is constrained)."""
    V = logits.shape[-1]
    allow = None  # (n, V) on the CPU (numpy: a few dozen row copies cost microseconds), only if needed
    for i, c in enumerate(constraints):
        m = c.allowed() if c is not None else None
        if m is None:
            continue
        m = np.asarray(m)
        if not m.any():
            raise RuntimeError("the constraint allows no token at all")
        if allow is None:
            allow = np.ones(logits.shape, dtype=np.bool_)
        w = min(V, m.shape[0])
        allow[i, :w] = m[:w]
        allow[i, w:] = False
    if allow is None:
        return logits
    return logits.masked_fill(~torch.from_numpy(allow).to(logits.device), float("-inf"))
