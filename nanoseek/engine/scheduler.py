"""Continuous batching: which requests run in the next step, and with how many tokens.

Every step has a token budget (`max_batch_tokens`). Running requests that are decoding take one
token each first — they are the latency users feel; what is left goes to prefill, in chunks, so a
long prompt never stalls everyone else for a whole step. Requests join between steps (admitted in
arrival order while there is room: a sequence slot, budget and cache blocks) and leave as soon as
they finish, so a short request never waits for a long neighbour.

When a decoding request needs a new block and none is free, the most recently admitted request
is preempted: its blocks are freed and it goes back to the front of the queue to be recomputed
later (prompt + what it generated so far; its full blocks are likely still in the prefix cache).
That never touches another request's latents, and the oldest requests always make progress.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .sampling import SamplerState, SamplingParams, TokenLogprob


@dataclass(eq=False)  # identity, not field-by-field: requests are looked up in lists every step
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int  # prompt + max_tokens, capped by the context
    sampler: SamplerState
    detok: object
    arrival: int
    all_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed: int = 0  # tokens whose latents are in the cache
    blocks: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)  # prefix keys of the registered full blocks
    cached_tokens: int | None = None  # prompt tokens served by the prefix cache (first admission)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    keep_output: bool = False
    stop_ids: set[int] = field(default_factory=set)  # stop_token_ids + EOS (unless ignore_eos)
    shared: int = 0  # positions < shared are prefix-cache blocks other requests read: never written
    # speculative decoding: the drafts of the next step, their distributions (sampled requests),
    # each MTP module's output at the last real slot (the next module's first input)
    drafts: list[int] = field(default_factory=list)
    draft_probs: list = field(default_factory=list)
    mtp_h: list = field(default_factory=list)

    @property
    def output_ids(self) -> list[int]:
        return self.all_ids[len(self.prompt_ids):]

    @property
    def remaining(self) -> int:
        return len(self.all_ids) - self.num_computed

    def slot(self, q: int, block_size: int) -> int:
        """The cache slot position q writes to: its block's, or the scratch slot 0 for a position
        in a shared prefix block (recomputed only for the hidden state the MTP modules read) and
        for an MTP entry past the blocks a full cache left the request (its drafts are then
        merely worse)."""
        if q < self.shared or q >= len(self.blocks) * block_size:
            return 0
        return self.blocks[q // block_size] * block_size + q % block_size


@dataclass
class Batch:
    decode: list[Request]
    prefill: list[tuple[Request, int]]  # (request, chunk length)


class Scheduler:
    """`lookahead`: slots a step may write beyond the tokens it computes (speculative decoding:
    the MTP modules' entries and drafts, up to k further), given blocks when some are free — never
    at the cost of a preemption or a smaller chunk; `backoff`: prompt positions of a prefix-cache
    hit computed again (into the scratch slot) for the hidden states the MTP modules need there."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batch_tokens: int, lookahead: int = 0,
                 backoff: int = 0):
        self.blocks = blocks
        self.bs = blocks.block_size
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self.lookahead, self.backoff = lookahead, backoff
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preempted = 0

    # -------------------------------------------------------------- blocks
    def _blocks_needed(self, r: Request, n: int) -> int:
        """New blocks for r to hold n more tokens."""
        have = len(r.blocks) * self.bs
        return max(0, -(-(r.num_computed + n - have) // self.bs))

    def _grow(self, r: Request, n: int) -> None:
        for _ in range(self._blocks_needed(r, n)):
            r.blocks.append(self.blocks.allocate())
        ahead = min(n + self.lookahead, r.max_len - r.num_computed)
        for _ in range(min(self._blocks_needed(r, ahead), self.blocks.num_free)):
            r.blocks.append(self.blocks.allocate())

    def free(self, r: Request) -> None:
        self.blocks.release(r.blocks)
        r.blocks, r.block_keys, r.num_computed, r.shared = [], [], 0, 0
        r.drafts, r.draft_probs, r.mtp_h = [], [], []

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.free(victim)
        self.waiting.appendleft(victim)
        self.num_preempted += 1

    # -------------------------------------------------------------- the step plan
    def schedule(self) -> tuple[Batch, list[Request]]:
        """Plan one step → (batch, requests that can never grow and must finish now)."""
        budget = self.max_batch_tokens
        decode: list[Request] = []
        prefill: list[tuple[Request, int]] = []
        stuck: list[Request] = []
        # 1. decodes, oldest first (each with its drafts, as the budget allows); make room by
        #    preempting the newest
        for r in sorted((r for r in self.running if r.remaining == 1), key=lambda r: r.arrival):
            if budget == 0:
                break
            if r not in self.running:  # preempted below, while making room for an older one
                continue
            while self._blocks_needed(r, 1) > self.blocks.num_free:
                victims = [v for v in self.running if v is not r and v not in decode]
                if not victims:
                    break
                self._preempt(max(victims, key=lambda v: v.arrival))
            if self._blocks_needed(r, 1) > self.blocks.num_free:
                if len(self.running) == 1 and not decode:
                    stuck.append(r)  # alone and the whole cache is not enough: it cannot grow
                else:
                    self._preempt(r)
                continue
            # its drafts ride along as far as the budget and the free blocks allow
            n = 1 + len(r.drafts)
            while n > 1 and (n > budget or self._blocks_needed(r, n) > self.blocks.num_free):
                n -= 1
            r.drafts = r.drafts[:n - 1]
            self._grow(r, n)
            decode.append(r)
            budget -= n
        # 2. running requests in the middle of their prompt
        for r in sorted((r for r in self.running if r.remaining > 1), key=lambda r: r.arrival):
            # as much as the budget and the blocks we can get allow
            n = min(r.remaining, budget, (len(r.blocks) + self.blocks.num_free) * self.bs - r.num_computed)
            if n <= 0:
                continue
            self._grow(r, n)
            prefill.append((r, n))
            budget -= n
        # 3. admit waiting requests, in order, while everything fits
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if r.num_computed == 0 and not r.blocks:
                hit, keys = self.blocks.match(r.all_ids, (len(r.all_ids) - 1) // self.bs)
                r.blocks, r.block_keys, r.shared = hit, keys, len(hit) * self.bs
                r.num_computed = max(0, r.shared - self.backoff)
            n = min(r.remaining, budget)
            if self._blocks_needed(r, n) > self.blocks.num_free:
                # a chunk that fits what is free (whole blocks), else wait for others to finish
                n = min(n, (len(r.blocks) + self.blocks.num_free) * self.bs - r.num_computed)
                if n <= 0:
                    self.free(r)  # give the hits back; matched again next time
                    break
            self.waiting.popleft()
            self.running.append(r)
            if r.cached_tokens is None:  # first admission: what the prefix cache saved of the prompt
                r.cached_tokens = min(r.shared, len(r.prompt_ids))
            self._grow(r, n)
            prefill.append((r, n))
            budget -= n
        return Batch(decode, prefill), stuck

    def register_full_blocks(self, r: Request) -> None:
        """After a forward: remember every block of r that is now full (prefix cache)."""
        parent = r.block_keys[-1] if r.block_keys else None
        for j in range(len(r.block_keys), r.num_computed // self.bs):
            key = self.blocks.key(parent, r.all_ids[j * self.bs:(j + 1) * self.bs])
            self.blocks.register(r.blocks[j], key)
            r.block_keys.append(key)
            parent = key
