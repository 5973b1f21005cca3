"""Choosing the next token: penalties, temperature, top-k, top-p, seeded draws, logprobs.

Why counter-based random numbers: a seed must give the same text whether the request runs alone
or beside thirty others. A shared generator would hand each request whatever random numbers its
neighbours left over. So the draw for a request's t-th token reads uniforms that are a hash of
(seed, t, token id) alone: every row of a batch is sampled at once (Gumbel-max over the
filtered logits), and each still sees only its own random stream. Requests without a seed get
one from torch's global generator when they arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"SamplingParams: {msg}")
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
    """Per-request sampling state: its seed and draw counter and, only if penalties are on, token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab: int, device):
        self.params = params
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
        if self.counts is not None and 0 <= token < self.counts.shape[0]:
            self.counts[token] += 1
            self.seen[token] = True

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.counts is None:
            return logits
        if p.repetition_penalty != 1.0:
            pen = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, pen, logits)
        return logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0)


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


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x < 2³², in int64 without overflow (c split in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with low bias (Wellons' lowbias32): every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor, V: int) -> torch.Tensor:
    """(n,) seeds and draw counters → (n, V) uniforms in (0, 1), a pure function of (seed, counter, column)."""
    key = _mix32((_mix32(seeds & _M32) + counters) & _M32)  # one key per (seed, counter)
    col = _mul32(torch.arange(V, device=seeds.device), 0x9E3779B9)  # columns spread by the golden ratio
    h = _mix32((key[:, None] + col[None]) & _M32)
    return ((h >> 8).float() + 0.5) * 2.0**-24  # 24 random bits: exact in fp32, never 0 or 1


def draw(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Sampled rows (n, V), one state each → one token per row: argmax of z/T + Gumbel noise over
    the top-k/top-p-filtered logits, which is a draw from softmax(z/T) restricted to them."""
    dev = logits.device
    ps = [s.params for s in states]
    temp = torch.tensor([p.temperature for p in ps], device=dev)[:, None]
    # shift so the best logit is 0 before dividing: a tiny temperature then gives a one-hot
    # distribution instead of inf − inf = NaN
    z = (logits - logits.max(-1, keepdim=True).values) / temp
    if any(p.top_k or p.top_p < 1.0 for p in ps):
        z = filter_top_k_top_p(z, torch.tensor([p.top_k for p in ps], device=dev),
                               torch.tensor([p.top_p for p in ps], device=dev))
    seeds = torch.tensor([s.seed for s in states], device=dev)
    steps = torch.tensor([s.step for s in states], device=dev)
    u = uniforms(seeds, steps, logits.shape[1])
    return (z - torch.log(-torch.log(u))).argmax(-1)


def sample(logits: torch.Tensor, states: list[SamplerState]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits (B, V) fp32, one state per row → next token per row (+ its logprob when asked)."""
    B = logits.shape[0]
    penalised = [i for i, s in enumerate(states) if s.counts is not None]
    drawn = [i for i, s in enumerate(states) if not s.params.greedy]
    x = logits
    if penalised:
        x = logits.clone()
        for i in penalised:
            x[i] = states[i].penalise(logits[i])
    if penalised or drawn:
        # extreme penalties can overflow a logit to ±inf; keep the order, lose the infinities
        x = torch.nan_to_num(x, nan=float("-inf"), posinf=1e30, neginf=-1e30)
    tokens = x.argmax(-1)
    if drawn:
        tokens[drawn] = draw(x[drawn], [states[i] for i in drawn])
    out = tokens.tolist()
    lps: list[TokenLogprob | None] = [None] * B
    want = [i for i, s in enumerate(states) if s.params.logprobs or s.params.top_logprobs]
    if want:
        # logprobs of the model's own distribution (before penalties/temperature), as OpenAI reports them
        logp = logits[want].log_softmax(-1)
        chosen = logp.gather(1, tokens[want, None])[:, 0].tolist()
        k = max(states[i].params.top_logprobs for i in want)
        top_v, top_i = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(want):
            n = states[i].params.top_logprobs
            lps[i] = TokenLogprob(out[i], chosen[j], dict(zip(top_i[j][:n], top_v[j][:n])))
    return out, lps
