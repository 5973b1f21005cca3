"""Choosing the next token: penalties, temperature, top-k, top-p, seeded draws, logprobs.

Why counter-based random numbers: a seed must give the same text whether the request runs alone
or beside thirty others. A shared generator would hand each request whatever random numbers its
neighbours left over. So the draw for a request's t-th token reads a uniform that is a hash of
(seed, t) alone, and every row of a batch is sampled at once by inverting its own CDF over the
filtered softmax: one random number per token, not one per vocabulary entry. Requests without a
seed get one from torch's global generator when they arrive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .constraints import ConstraintFactory, apply_masks


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    frequency_penalty: float = 0.0  # OpenAI: logit −= f · count(token in output)
    presence_penalty: float = 0.0  # OpenAI: logit −= p · [token in output]
    repetition_penalty: float = 1.0  # CTRL/HF: seen tokens (prompt + output) logit /= r if > 0 else *= r
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    # allowed-token constraint: a factory called once per request for its own state
    # (nanoseek/engine/constraints.py; e.g. a Grammar for JSON output)
    constraint: ConstraintFactory | None = None
    # back up the prompt's last token and make the first sampled token(s) spell its text
    token_healing: bool = False

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"SamplingParams: {msg}")
        for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                bad(f"{name}={getattr(self, name)} must be a finite number")
        if self.max_tokens < 1:
            bad(f"max_tokens={self.max_tokens} must be ≥ 1")
        if self.temperature < 0:
            bad(f"temperature={self.temperature} must be ≥ 0")
        if not 0 <= self.top_p <= 1:  # 0 keeps only the most likely token (OpenAI's range)
            bad(f"top_p={self.top_p} must be in [0, 1]")
        if self.top_k < 0:
            bad(f"top_k={self.top_k} must be ≥ 0")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if self.top_logprobs < 0:
            bad(f"top_logprobs={self.top_logprobs} must be ≥ 0")
        if self.constraint is not None and not callable(self.constraint):
            bad("constraint must be a factory of per-request constraint states (e.g. constraints.Grammar)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]

    @property
    def greedy(self) -> bool:
        # below 1e-5 a temperature is greedy in all but name (and would underflow fp32 to 0)
        return self.temperature < 1e-5

    @property
    def penalised(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model, and the `top_logprobs` best."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float] = field(default_factory=dict)


class SamplerState:
    """Per-request sampling state: its seed and draw counter, its allowed-token constraint (if
    any) and, only if penalties are on, token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab: int, device, constraint=None):
        self.params = params
        self.constraint = constraint
        self.seed = None
        if not params.greedy:
            self.seed = int(params.seed) if params.seed is not None else int(torch.randint(2**31, ()))
        self.step = 0  # tokens drawn so far: the counter of this request's random stream
        self.counts = self.seen = None
        if params.penalised:
            self.counts = torch.zeros(vocab, device=device)  # in the output, for frequency/presence
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)  # prompt + output, repetition
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab], dtype=torch.long, device=device)
            self.seen[ids] = True

    def observe(self, token: int) -> None:
        self.step += 1
        if self.constraint is not None:
            self.constraint.advance(token)
        if self.counts is not None and 0 <= token < self.counts.shape[0]:
            self.counts[token] += 1
            self.seen[token] = True

    def penalise(self, logits: torch.Tensor, extra: list[int] | tuple = ()) -> torch.Tensor:
        """The penalised logits of the next token, as if the `extra` tokens (a speculative step's
        drafts or just-accepted tokens) had been observed too."""
        p = self.params
        if self.counts is None:
            return logits
        counts, seen = self.counts, self.seen
        if extra:
            ids = torch.tensor([t for t in extra if 0 <= t < counts.shape[0]], dtype=torch.long, device=counts.device)
            counts = counts.index_add(0, ids, torch.ones_like(ids, dtype=counts.dtype))
            seen = seen.index_fill(0, ids, True)
        if p.repetition_penalty != 1.0:
            pen = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(seen, pen, logits)
        return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Rows of logits (n, V), per-row top_k (n,) (0 = off) and top_p (n,) → every logit outside the
    row's top-k, and outside the smallest set with mass ≥ top_p (of the top-k), set to −inf."""
    V = logits.shape[-1]
    ranked = logits.sort(dim=-1, descending=True).values
    k = torch.where((top_k > 0) & (top_k < V), top_k, torch.full_like(top_k, V))
    ranked = ranked.masked_fill(torch.arange(V, device=logits.device) >= k[:, None], float("-inf"))
    probs = ranked.softmax(-1)
    # drop a token when the mass strictly before it already reaches top_p; the best one always
    # survives (rounding can push its prefix above a tiny top_p)
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    kept = (~drop & (ranked > float("-inf"))).sum(-1, keepdim=True)
    cutoff = ranked.gather(1, kept - 1)  # the smallest logit kept
    return logits.masked_fill(logits < cutoff, float("-inf"))


def _mix32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer hash with low bias (Wellons' lowbias32): every output bit depends on every
    input bit. uint32 arithmetic wraps mod 2³², which is what the hash needs."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: list[int], counters: list[int], stream: int = 0) -> torch.Tensor:
    """Seeds and draw counters → (n,) fp64 uniforms in (0, 1), a pure function of (seed, counter,
    stream) with 53 random bits (two hash words), so a token's probability is resolved to ~1e-16.
    `stream` separates independent uses of one counter (speculative decoding draws a draft, an
    acceptance test and the final token for the same output position).
    (numpy: a few dozen numbers, hashed in microseconds; a dozen tiny torch ops took 0.2 ms.)"""
    seed32 = np.array([(s ^ stream * 0x9E3779B9) & 0xFFFFFFFF for s in seeds], dtype=np.uint32)
    # lowbias32 maps 0 to 0: without the constant (murmur3's), seed 0's first key would be 0 and its first
    # uniform ~7e-9 (always the lowest token id with any mass); with it, the one seed whose key is
    # 0 at a given counter is an arbitrary-looking 32-bit number, as likely as any other
    key = _mix32((_mix32(seed32) ^ np.uint32(0xC2B2AE35)) + np.array(counters, dtype=np.uint32))
    lo = _mix32(key ^ np.uint32(0x5BD1E995))
    bits = (key.astype(np.uint64) >> np.uint64(6)) << np.uint64(27) | (lo >> np.uint32(5)).astype(np.uint64)
    return torch.from_numpy((bits.astype(np.float64) + 0.5) * 2.0**-53)  # never 0 or 1


def probs(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Rows of (penalised) logits (n, V), one state each → the distribution each row samples
    from, fp64: softmax(z/T) restricted to the top-k/top-p-filtered logits (a filtered token has
    probability 0)."""
    dev = logits.device
    ps = [s.params for s in states]
    z = logits
    if any(p.temperature != 1.0 for p in ps):
        temp = torch.tensor([p.temperature for p in ps], device=dev)[:, None]
        # shift so the best logit is 0 before dividing: a tiny temperature then gives a one-hot
        # distribution instead of inf − inf = NaN
        z = (logits - logits.max(-1, keepdim=True).values) / temp
    if any(p.top_k or p.top_p < 1.0 for p in ps):
        z = filter_top_k_top_p(z, torch.tensor([p.top_k for p in ps], device=dev),
                               torch.tensor([p.top_p for p in ps], device=dev))
    return z.softmax(-1).double()  # fp64: no mass lost to rounding over a large vocabulary


def inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows of probabilities (n, V) (not necessarily normalised) and uniforms (n,) → the first
    token whose cumulative probability exceeds u·total (inverse-CDF sampling)."""
    cdf = p.cumsum(-1)
    # u·total < total: the index found is at most the last token with probability > 0
    return torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True)[:, 0]


def draw(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Sampled rows (n, V), one state each → one token per row from `probs`, at the row's
    uniform for its seed and draw counter."""
    u = uniforms([s.seed for s in states], [s.step for s in states])
    return inverse_cdf(probs(logits, states), u.to(logits.device))


def penalised(logits: torch.Tensor, states: list[SamplerState], extras: list | None = None) -> torch.Tensor:
    """Rows of raw logits → what sampling reads: each row penalised by its state (with that
    row's `extras` as if observed), infinities from extreme penalties made finite."""
    rows = [i for i, s in enumerate(states) if s.counts is not None]
    if not rows and all(s.params.greedy for s in states):
        return logits
    x = logits
    if rows:
        x = logits.clone()
        for i in rows:
            x[i] = states[i].penalise(logits[i], extras[i] if extras is not None else ())
    # extreme penalties can overflow a logit to ±inf; keep the order, lose the infinities
    return torch.nan_to_num(x, nan=float("-inf"), posinf=1e30, neginf=-1e30)


def token_logprobs(logits: torch.Tensor, tokens: list[int], states: list[SamplerState]) -> list[TokenLogprob | None]:
    """Each row's chosen token's logprob (and the `top_logprobs` best) under the model's own
    distribution, before penalties and temperature, as OpenAI reports them; None where not asked."""
    lps: list[TokenLogprob | None] = [None] * len(tokens)
    want = [i for i, s in enumerate(states) if s.params.logprobs or s.params.top_logprobs]
    if not want:
        return lps
    logp = logits[want].log_softmax(-1)
    chosen = logp.gather(1, torch.tensor([tokens[i] for i in want], device=logits.device)[:, None])[:, 0].tolist()
    k = max(states[i].params.top_logprobs for i in want)
    top_v, top_i = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(want):
        n = states[i].params.top_logprobs
        lps[i] = TokenLogprob(tokens[i], chosen[j], dict(zip(top_i[j][:n], top_v[j][:n])))
    return lps


def sample(logits: torch.Tensor, states: list[SamplerState]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits (B, V) fp32, one state per row → next token per row (+ its logprob when asked).
    A row's constraint masks its penalised logits before temperature, top-k/top-p and the draw."""
    B = logits.shape[0]
    drawn = [i for i, s in enumerate(states) if not s.params.greedy]
    x = apply_masks(penalised(logits, states), [s.constraint for s in states])
    if len(drawn) == B:
        tokens = draw(x, states)
    else:
        tokens = x.argmax(-1)
        if drawn:
            tokens[drawn] = draw(x[drawn], [states[i] for i in drawn])
    out = tokens.tolist()
    return out, token_logprobs(logits, out, states)
