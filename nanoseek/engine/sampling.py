"""Choosing the next token: penalties, temperature, top-k, top-p, seeded draws, logprobs.

Why a torch.Generator per request: a seed must give the same text whether the request runs alone
or beside thirty others. A shared generator would hand each request whatever random numbers its
neighbours left over; a private one is consumed exactly once per token of its own request.

Greedy rows (temperature 0, no penalties) take one batched argmax; only sampled rows pay a
per-row loop, which they need anyway for their private generators.
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
    """Per-request sampling state: its generator and, only if penalties are on, token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab: int, device):
        self.params = params
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(int(params.seed))
        self.counts = self.seen = None
        if params.penalised:
            self.counts = torch.zeros(vocab, device=device)  # in the output, for frequency/presence
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)  # prompt + output, repetition
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab], dtype=torch.long, device=device)
            self.seen[ids] = True

    def observe(self, token: int) -> None:
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


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to −inf every logit outside the top-k and outside the smallest set with mass ≥ top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps at least one)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False  # the best token always survives (rounding can push its prefix above a tiny top_p)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, states: list[SamplerState]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits (B, V) fp32, one state per row → next token per row (+ its logprob when asked)."""
    B = logits.shape[0]
    tokens = logits.argmax(-1)
    special = [i for i, s in enumerate(states) if not s.params.greedy or s.counts is not None]
    if special:
        tokens = tokens.clone()
        for i in special:
            st = states[i]
            p = st.params
            # extreme penalties can overflow a logit to ±inf; keep the order, lose the infinities
            row = torch.nan_to_num(st.penalise(logits[i]), nan=float("-inf"), posinf=1e30, neginf=-1e30)
            if p.greedy:
                tokens[i] = row.argmax()
                continue
            # shift so the best logit is 0 before dividing: a tiny temperature then gives a
            # one-hot distribution instead of inf − inf = NaN
            row = filter_top_k_top_p((row - row.max()) / p.temperature, p.top_k, p.top_p)
            tokens[i] = torch.multinomial(row.softmax(-1), 1, generator=st.generator)[0]
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
