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

    @property
    def output_ids(self) -> list[int]:
        return self.all_ids[len(self.prompt_ids):]

    @property
    def remaining(self) -> int:
        return len(self.all_ids) - self.num_computed


@dataclass
class Batch:
    decode: list[Request]
    prefill: list[tuple[Request, int]]  # (request, chunk length)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batch_tokens: int):
        self.blocks = blocks
        self.bs = blocks.block_size
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
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

    def free(self, r: Request) -> None:
        self.blocks.release(r.blocks)
        r.blocks, r.block_keys, r.num_computed = [], [], 0

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
        # 1. decodes, oldest first; make room by preempting the newest
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
            self._grow(r, 1)
            decode.append(r)
            budget -= 1
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
                r.blocks, r.block_keys, r.num_computed = hit, keys, len(hit) * self.bs
            n = min(r.remaining, budget)
            if self._blocks_needed(r, n) > self.blocks.num_free:
                # a chunk that fits what is free (whole blocks), else wait for others to finish
                n = min(n, (len(r.blocks) + self.blocks.num_free) * self.bs - r.num_computed)
                if n <= 0:
                    self.blocks.release(r.blocks)  # give the hits back; matched again next time
                    r.blocks, r.block_keys, r.num_computed = [], [], 0
                    break
            self.waiting.popleft()
            self.running.append(r)
            if r.cached_tokens is None:  # first admission: what the prefix cache saved of the prompt
                r.cached_tokens = min(r.num_computed, len(r.prompt_ids))
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
