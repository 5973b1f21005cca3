"""The inference engine: continuous batching over a paged latent cache, with prefix caching.

One `step()` = plan (scheduler) → one batched forward (`PagedMLA`, nanoseek/engine/paged_mla.py)
→ sample → detokenise:

* every decode row (one new token) and every prefill chunk of the step, however long, go through
  one forward over their flat real tokens — projections, norms and the MoE never see padding;
* attention is *absorbed* MLA: each row's queries score, in latent space, its sequence's blocks,
  gathered into a padded (B, S, rank + rope) latent tensor per group of rows of similar length
  (docs/deepseek.md, MLA); prefill chunks attend to their own new tokens and to whatever earlier blocks
  the prefix cache or earlier chunks already hold, a long one in blocks of queries.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .constraints import TextPrefix, VocabIndex
from .detok import Detokenizer, token_bytes_table
from .kv_cache import BlockManager, PagedLatentCache
from .paged_mla import AttnGroup, PagedMLA, attention_groups
from .sampling import SamplerState, SamplingParams, TokenLogprob, sample, token_logprobs
from .scheduler import Batch, Request, Scheduler
from .speculative import Drafter, Fill, verify


class PromptTooLongError(ValueError):
    """The prompt cannot be served: it does not fit the model's context (or the whole KV cache)."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (its finish_reason is "error"); the others go on."""

    def __init__(self, request_id: str, cause: str):
        super().__init__(f"request {request_id} failed in the engine: {cause}")
        self.request_id = request_id


def check_device(name: str | None) -> None:
    """``--device`` names a device this machine has, or one line saying what is available."""
    if name is None:
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r}: not a device name; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {name}: no CUDA device on this machine; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N")


@dataclass
class RequestOutput:
    """The final result of one request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    cached_tokens: int
    logprobs: list[TokenLogprob] | None
    error: str | None = None  # why, when finish_reason is "error"


@dataclass
class StreamEvent:
    """What one step produced for one request."""

    request_id: str
    text_delta: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    cached_tokens: int
    num_prompt_tokens: int
    num_completion_tokens: int
    logprobs: list[TokenLogprob] | None
    error: str | None = None  # finish_reason "error": what failed (the request alone failed)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators; fp32 on CPU, where bf16 matmuls are slower on most laptop cores
    (measured in benchmarks/decode.py) and the cache is small anyway."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(eq=False)
class Piece:
    """Tokens of one request that a step's forward computes: ids at positions start…; row0 is
    where its first row lands in the flat batch."""

    r: Request
    start: int
    ids: list[int]
    row0: int = 0


class Engine:
    def __init__(self, model_or_path, tokenizer=None, *, device=None, dtype=None, max_num_seqs: int = 64,
                 max_batch_tokens: int = 2048, block_size: int = 16, num_blocks: int | None = None,
                 cache_tokens: int | None = None, enable_prefix_cache: bool = True, speculative_tokens: int = 0):
        from ..checkpoint import cast, load_pretrained, resolve_ckpt
        from ..tokenizer import Tokenizer

        if isinstance(model_or_path, (str, Path)):
            path = resolve_ckpt(model_or_path)  # a run directory → its model/ (weights and tokenizer)
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            model = load_pretrained(path, device=dev, dtype=dtype or default_dtype(dev))
            if tokenizer is None and (path / "tokenizer.json").is_file():
                tokenizer = Tokenizer.load(path)
        else:
            model = model_or_path
            if device is not None:
                model = model.to(device)
            model = cast(model, dtype)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = Tokenizer.load(tokenizer)
        self.model = model.eval()
        self.config = cfg = model.config
        self.tokenizer = tokenizer
        self.device = model.embed_tokens.weight.device
        self.max_context: int = cfg.max_position_embeddings
        self.block_size = block_size
        if max_batch_tokens < 1 or max_num_seqs < 1:
            raise ValueError(f"max_batch_tokens={max_batch_tokens} and max_num_seqs={max_num_seqs} must be ≥ 1")
        if speculative_tokens < 0:
            raise ValueError(f"speculative_tokens={speculative_tokens} must be ≥ 0 (0 = off)")
        if speculative_tokens and not cfg.num_nextn_predict_layers:
            raise ValueError(f"speculative_tokens={speculative_tokens}: the model has no MTP module to draft with "
                             "(num_nextn_predict_layers = 0); use 0")
        self.speculative_tokens = k = speculative_tokens
        depth = min(k, cfg.num_nextn_predict_layers)  # MTP modules that draft (each has a cache layer)
        per_token = (cfg.num_hidden_layers + depth) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) \
            * model.embed_tokens.weight.element_size()
        if num_blocks is None:
            if cache_tokens is None:  # room for every sequence at full context, within a memory cap
                cap = 1 << 30
                if self.device.type == "cuda":
                    cap = int(torch.cuda.mem_get_info(self.device)[0] * 0.5)
                cache_tokens = min(max_num_seqs * self.max_context, cap // per_token)
            num_blocks = math.ceil(cache_tokens / block_size) + 1  # + the scratch block
        self.cache = PagedLatentCache.for_model(model, num_blocks, block_size, depth)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_cache)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_batch_tokens, lookahead=k, backoff=depth)
        self.num_blocks = num_blocks - 1  # usable (block 0 is scratch)
        self._table = token_bytes_table(tokenizer) if tokenizer is not None else None
        self._vocab_index: VocabIndex | None = None  # token healing's, built on first use
        eos = getattr(tokenizer, "eos_id", None)
        self.eos_id = eos if eos is not None else cfg.eos_token_id
        self._ids = itertools.count()
        self._live: dict[str, Request] = {}
        self._outputs: dict[str, RequestOutput] = {}
        self._aborted: list[StreamEvent] = []
        self.paged = PagedMLA(model)
        self.drafter = Drafter(self.paged, self.cache, block_size, k) if k else None
        self.prefill_tokens = 0  # prompt tokens computed (prefix-cache hits and copied chunks excluded)
        # speculative decoding: verifying steps, and per draft position drafts verified / accepted
        self.spec_steps = 0
        self.spec_drafted = [0] * k
        self.spec_accepted = [0] * k

    # ------------------------------------------------------------------ state
    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def cache_usage(self) -> float:
        """Fraction of blocks held by live requests (cached-but-unused prefix blocks count as free)."""
        return self.blocks.num_used / self.num_blocks

    @property
    def bytes_per_token(self) -> int:
        return self.cache.bytes_per_token

    @property
    def stats(self) -> dict:
        """Counters since the engine started. With speculative decoding (vLLM's names): verifying
        steps (`spec_num_drafts`), draft tokens verified and accepted, both per draft position,
        the acceptance rate and the mean accepted length (tokens a verifying step emits, the
        target's own token included)."""
        out = {"prefill_tokens": self.prefill_tokens, "preemptions": self.scheduler.num_preempted}
        if self.speculative_tokens:
            drafted, accepted = sum(self.spec_drafted), sum(self.spec_accepted)
            out.update(spec_num_drafts=self.spec_steps, spec_num_draft_tokens=drafted,
                       spec_num_accepted_tokens=accepted, spec_num_draft_tokens_per_pos=list(self.spec_drafted),
                       spec_num_accepted_tokens_per_pos=list(self.spec_accepted),
                       spec_acceptance_rate=accepted / drafted if drafted else 0.0,
                       spec_mean_accepted_length=1 + accepted / self.spec_steps if self.spec_steps else 0.0)
        return out

    def update_weights(self) -> None:
        """Call after changing the model's weights in place (e.g. between GRPO steps): the decode
        path keeps pre-folded copies of the attention weights. Cached prefixes are dropped too —
        their latents came from the old weights (so, like `reset_prefix_cache`, it needs an idle engine)."""
        self.reset_prefix_cache()
        self.paged = PagedMLA(self.model)
        if self.drafter is not None:
            self.drafter.paged = self.paged

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._aborted)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block. Call it after the weights change in place (GRPO
        trains the very model object the engine holds): cached latents were computed by the old
        weights and would otherwise be reused for the next rollouts' prompts."""
        if self.has_unfinished():
            raise RuntimeError("reset_prefix_cache() needs an idle engine (requests are still running)")
        bm = self.blocks
        bm.free.extend(bm.lru)
        bm.lru.clear()
        bm.key_of.clear()
        bm.block_of.clear()

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or Engine(..., tokenizer=)")
            return self.tokenizer.encode(prompt)
        return [int(i) for i in prompt]

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, _keep_output: bool = False) -> str:
        """Queue a request; it joins the running batch at the next step with room. Returns its id."""
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt_ids)
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("empty prompt: at least one token is needed to predict the next")
        if n >= self.max_context:
            raise PromptTooLongError(f"the prompt is {n} tokens but the model's context is {self.max_context} "
                                     f"tokens (prompt + at least 1 generated token must fit); shorten the prompt")
        capacity = self.num_blocks * self.block_size
        if n + 1 > capacity:
            raise PromptTooLongError(f"the prompt is {n} tokens but the whole KV cache holds {capacity} tokens "
                                     f"(context limit {self.max_context}); raise cache_tokens / num_blocks")
        bad = [i for i in prompt_ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._live:
            raise ValueError(f"request id {rid!r} is already in use")
        constraint = params.constraint() if params.constraint is not None else None
        healed = b""
        if params.token_healing and constraint is None:
            prompt_ids, healed, constraint = self._heal(prompt_ids)
            n = len(prompt_ids)
        r = Request(rid, prompt_ids, params, min(n + params.max_tokens, self.max_context),
                    SamplerState(params, prompt_ids, self.config.vocab_size, self.device, constraint),
                    Detokenizer(self.tokenizer, params.stop, self._table, skip=healed), next(self._ids),
                    all_ids=list(prompt_ids), keep_output=_keep_output)
        r.stop_ids = set(params.stop_token_ids) | ({self.eos_id} if self.eos_id is not None and not params.ignore_eos else set())
        r.logprobs = [] if (params.logprobs or params.top_logprobs) else None
        self._live[rid] = r
        self.scheduler.waiting.append(r)
        return rid

    def _heal(self, prompt_ids: list[int]) -> tuple[list[int], bytes, TextPrefix | None]:
        """Token healing: a prompt that ends mid-token ("def f(n):\\n    " ends in a run of
        spaces the model rarely saw as one token before code) loses its last token, and the first
        sampled token(s) must spell that token's text — so the model chooses how the text there
        is split. The backed-up bytes are the prompt's, so they are left out of the output text.
        → (the prompt's ids, the backed-up bytes, the constraint); a special last token, a
        one-token prompt or a tokenizer that is not byte-level is left as it is."""
        if self._table is None or len(prompt_ids) < 2:
            return prompt_ids, b"", None
        if self._vocab_index is None:
            self._vocab_index = VocabIndex(self._table, self.tokenizer.special_ids, self.config.vocab_size)
        last = prompt_ids[-1]
        text = self._table[last] if last < len(self._table) else b""
        if not text or last in self._vocab_index.special:
            return prompt_ids, b"", None
        return prompt_ids[:-1], text, TextPrefix(self._vocab_index, text)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its cache blocks; its last event (finish_reason "abort")
        comes out of the next step()."""
        r = self._live.get(request_id)
        if r is None:
            return
        self._unschedule(r)
        self._aborted.append(self._finish(r, "abort", ""))

    def _unschedule(self, r: Request) -> None:
        """Take a request out of the scheduler's queues and give its cache blocks back."""
        s = self.scheduler
        if r in s.running:
            s.running.remove(r)
        elif r in s.waiting:
            s.waiting.remove(r)
        s.free(r)

    def _finish(self, r: Request, reason: str, delta: str, tokens=(), lps=None, error: str | None = None
                ) -> StreamEvent:
        r.finish_reason = reason
        self._live.pop(r.request_id, None)
        if r.keep_output:
            self._outputs[r.request_id] = RequestOutput(r.request_id, r.prompt_ids, r.output_ids, r.detok.text,
                                                        reason, r.cached_tokens or 0, r.logprobs, error)
        ev = self._event(r, delta, list(tokens), reason, lps)
        ev.error = error
        return ev

    def _fail(self, r: Request, e: BaseException) -> StreamEvent:
        """End one request with finish_reason "error" and free its blocks."""
        self._unschedule(r)
        return self._finish(r, "error", "", error=f"{type(e).__name__}: {e}")

    def _event(self, r: Request, delta: str, tokens: list[int], reason: str | None, lps) -> StreamEvent:
        return StreamEvent(r.request_id, delta, tokens, reason is not None, reason, r.cached_tokens or 0,
                           len(r.prompt_ids), len(r.all_ids) - len(r.prompt_ids), lps)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> list[StreamEvent]:
        """Run one scheduling step; return an event for every request that produced something.

        A step that raises is re-run one request at a time, so that the request that fails ends
        alone (finish_reason "error") while the rest of the batch goes on: `_run` changes no
        request's state before its forward and sampling have succeeded."""
        events, self._aborted = self._aborted, []
        batch, stuck = self.scheduler.schedule()
        for r in stuck:  # alone, and the whole cache cannot hold one more token
            self.scheduler.running.remove(r)
            self.scheduler.free(r)
            events.append(self._finish(r, "length", r.detok.flush()))
        try:
            return events + self._run(batch)
        except Exception as e:
            error = e
        alone = [(r, Batch([r], [])) for r in batch.decode] + [(c[0], Batch([], [c])) for c in batch.prefill]
        if len(alone) == 1:  # it failed alone already
            return events + [self._fail(alone[0][0], error)]
        for r, one in alone:
            try:
                events += self._run(one)
            except Exception as e:
                events.append(self._fail(r, e))
        return events

    def _run(self, batch: Batch) -> list[StreamEvent]:
        """Forward, sample (and draft) one planned batch, then commit: every request's state
        changes only after all of its batch's computation has succeeded (latents written to
        not-yet-computed positions are simply written again on a re-run)."""
        dev = self.device
        unique, copies = self._dedupe(batch.prefill)
        decode = [Piece(r, r.num_computed, r.all_ids[r.num_computed:r.num_computed + 1] + r.drafts)
                  for r in batch.decode]
        pieces = decode + [Piece(r, r.num_computed, r.all_ids[r.num_computed:r.num_computed + n]) for r, n in unique]
        h = self._forward(pieces) if pieces else None
        checking = [p for p in decode if len(p.ids) > 1]  # rows that verify drafts
        # the rows that sample one token: decode rows without drafts, chunks reaching the end of the prompt
        ready = [p for p in pieces if p.r.remaining == len(p.ids)]
        rows = [p.row0 + len(p.ids) - 1 for p in ready]
        # identical chunks: latents copied, their source's rows read (its last for their next token)
        piece_of = {id(p.r): p for p in pieces}
        copied = [(r, piece_of[id(src)]) for r, _, src in copies]
        twins = [(r, p) for r, p in copied if p.r.remaining == len(p.ids)]
        rows += [p.row0 + len(p.ids) - 1 for _, p in twins]
        sampling = [p.r for p in ready] + [r for r, _ in twins]
        rows += [p.row0 + j for p in checking for j in range(len(p.ids))]
        out: dict[int, tuple[list[int], list]] = {}  # request → (the tokens it emits, their logprobs)
        if rows:
            hs = h if rows == list(range(h.shape[0])) else h.index_select(0, torch.tensor(rows, device=dev))
            logits = self.paged.logits(hs)
            n = len(sampling)
            if n:
                tokens, lps = sample(logits[:n], [r.sampler for r in sampling])
                out.update({id(r): ([t], [lp]) for r, t, lp in zip(sampling, tokens, lps)})
            if checking:
                reqs, counts = [p.r for p in checking], [len(p.ids) for p in checking]
                _, emitted = verify(logits[n:], reqs, counts)
                starts = [n + c for c in itertools.accumulate([0] + counts[:-1])]  # row j of a request emits its token j
                flat = [t for e in emitted for t in e]
                lps = token_logprobs(logits[[o + j for o, e in zip(starts, emitted) for j in range(len(e))]], flat,
                                     [r.sampler for r, e in zip(reqs, emitted) for _ in e])
                i = 0
                for r, e in zip(reqs, emitted):
                    out[id(r)] = (e, lps[i:i + len(e)])
                    i += len(e)
        fills = self._fills(pieces, copied, out) if self.drafter is not None else []
        if fills:
            self.drafter.run(fills, h)
        # ---- commit
        if copies:
            self._copy_latents(copies)
        self.prefill_tokens += sum(n for _, n in unique)
        for p in checking:
            n = len(out[id(p.r)][0]) - 1  # drafts kept
            self.spec_steps += 1
            for i in range(len(p.ids) - 1):
                self.spec_drafted[i] += 1
                self.spec_accepted[i] += i < n
        for p in decode:
            p.r.num_computed += len(out[id(p.r)][0])
        for r, n in batch.prefill:
            r.num_computed += n
        for f in fills:
            f.r.drafts, f.r.draft_probs, f.r.mtp_h = f.drafts, f.draft_probs, f.mtp_h
        for r in [p.r for p in decode] + [r for r, _ in batch.prefill]:
            self.scheduler.register_full_blocks(r)
        events: list[StreamEvent] = []
        for r in sampling + [p.r for p in checking]:
            try:
                events.append(self._accept(r, *out[id(r)]))
            except Exception as e:  # e.g. its detokenizer: this request alone
                events.append(self._fail(r, e))
        return events

    def _fills(self, pieces: list["Piece"], copied: list, out: dict) -> list[Fill]:
        """The MTP modules' work after the main forward: each request's slots after the
        positions it computed (their tokens now known: the prompt's, or what the step emits),
        then drafts for the next step unless it ends here. A copied chunk reads its source's
        hidden states; a verifying row computed only its kept drafts' positions for real."""
        fills = []
        for r, p in [(p.r, p) for p in pieces] + copied:
            got = out.get(id(r), ([], []))[0]
            m = len(got) if r.remaining == 1 else len(p.ids)  # decode/verify: x_N and the drafts kept
            seq = r.all_ids + got
            ends = not got or any(t in r.stop_ids for t in got) or len(seq) >= r.max_len
            # a constrained request drafts nothing (nanoseek/engine/constraints.py)
            k = 0 if ends or r.sampler.constraint is not None else min(self.speculative_tokens, r.max_len - len(seq) - 1)
            fills.append(Fill(r, p.start, [p.row0 + i for i in range(m)], seq[p.start + 1:p.start + m + 1], k, got))
        return fills

    def _accept(self, r: Request, tokens: list[int], lps: list[TokenLogprob | None]) -> StreamEvent:
        """Append the step's tokens (one, or a verified run of drafts and the token after them)
        until one ends the request."""
        delta, taken, reason = "", [], None
        for tok, lp in zip(tokens, lps):
            r.all_ids.append(tok)
            r.sampler.observe(tok)
            if r.logprobs is not None:
                r.logprobs.append(lp)
            taken.append(tok)
            is_stop = tok in r.stop_ids
            delta += r.detok.add(tok, visible=not is_stop)
            done = r.sampler.constraint is not None and r.sampler.constraint.done  # the grammar is complete
            reason = "stop" if (is_stop or r.detok.stopped or done) else ("length" if len(r.all_ids) >= r.max_len else None)
            if reason is not None:
                break
        got = [lp for lp in lps[:len(taken)] if lp is not None] or None
        if reason is None:
            return self._event(r, delta, taken, None, got)
        self.scheduler.running.remove(r)
        self.scheduler.free(r)
        return self._finish(r, reason, delta + r.detok.flush(), taken, got)

    @staticmethod
    def _dedupe(chunks: list[tuple[Request, int]]) -> tuple[list[tuple[Request, int]], list[tuple[Request, int, Request]]]:
        """Prefill chunks → (the distinct ones, [(copy, n, source)] for chunks whose sequence so far is
        token for token a distinct one's). GRPO sends each prompt G times in one batch: its
        latents are computed once and copied to the G − 1 others, whose first tokens are then
        drawn, each with its own seed, from the same logits row (vLLM's n > 1 does this by forking
        a sequence; here the copies are found by content, so the API and the requests stay as they are)."""
        unique: list[tuple[Request, int]] = []
        copies: list[tuple[Request, int, Request]] = []
        first: dict[tuple, Request] = {}
        for r, n in chunks:
            key = (r.num_computed, n, len(r.all_ids), tuple(r.all_ids[:r.num_computed + n]))
            src = first.setdefault(key, r)
            if src is r:
                unique.append((r, n))
            else:
                copies.append((r, n, src))
        return unique, copies

    def _copy_latents(self, copies: list[tuple[Request, int, Request]]) -> None:
        """Each copy's n new positions get its source's latents, in every layer (one gather and
        one scatter for all)."""
        bs, dst, src = self.block_size, [], []
        for r, n, s in copies:
            for p in range(r.num_computed, r.num_computed + n):
                dst.append(r.blocks[p // bs] * bs + p % bs)
                src.append(s.blocks[p // bs] * bs + p % bs)
        kv = self.cache.kv[:self.config.num_hidden_layers]  # the MTP modules' slots are filled per request
        kv.index_copy_(1, torch.tensor(dst, device=self.device), kv[:, torch.tensor(src, device=self.device)])

    def _forward(self, pieces: list["Piece"]) -> torch.Tensor:
        """One PagedMLA forward over every piece's tokens, flattened → their hidden states (N, D);
        each piece's first row is set in `piece.row0`. Rows attend in groups (`attention_groups`):
        padding is wasted gather and matmul."""
        dev, bs = self.device, self.block_size
        groups = attention_groups(pieces, lambda p: p.start, lambda p: len(p.ids))
        ids: list[int] = []
        pos: list[int] = []
        write: list[int] = []
        attn: list[AttnGroup] = []
        for g in groups:
            lens = [len(p.ids) for p in g]
            starts = [p.start for p in g]
            nb = -(-max(s + n for s, n in zip(starts, lens)) // bs)
            table = torch.tensor([(p.r.blocks + [0] * nb)[:nb] for p in g], device=dev)
            attn.append(AttnGroup(len(ids), lens, starts, table))
            for p in g:
                p.row0 = len(ids)
                ids += p.ids
                pos += range(p.start, p.start + len(p.ids))
                write += [p.r.slot(q, bs) for q in range(p.start, p.start + len(p.ids))]
        ids, pos, write = torch.tensor([ids, pos, write], device=dev)  # one host→tensor copy
        return self.paged.hidden(ids, pos, self.cache.kv, write, attn, bs, max(p.start + len(p.ids) for p in pieces))

    # ------------------------------------------------------------------ conveniences
    @torch.inference_mode()
    def score(self, prompt_ids: list[int], top: int = 0) -> tuple[list[float], list[dict[int, float]]]:
        """Log-probs of a prompt's own tokens, log p(t_i | t_<i) for i = 1…T−1 (float32), and the
        `top` most likely tokens at each of those positions: what evaluation harnesses read to score
        a text. One plain forward of the model, outside the paged cache, so no request is touched;
        call it between steps (AsyncEngine.score)."""
        ids = torch.tensor([[int(i) for i in prompt_ids]], device=self.device)
        lp = self.model(ids)[0, :-1].float().log_softmax(-1)  # position i predicts token i + 1
        values = lp.gather(-1, ids[0, 1:, None])[:, 0].tolist()
        if not top:
            return values, [{} for _ in values]
        v, i = lp.topk(min(top, lp.shape[-1]), dim=-1)
        return values, [dict(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run all prompts to completion (batched, continuous) → outputs in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        rids = [self.add_request(p, sp, _keep_output=True) for p, sp in zip(prompts, plist)]
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(rids), desc="generate", unit="req")
        pending = set(rids)
        while pending:
            for ev in self.step():
                if ev.finished and ev.request_id in pending:
                    pending.discard(ev.request_id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [self._outputs.pop(r) for r in rids]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[StreamEvent]:
        """Generate one prompt, yielding its events as they come (drives step() itself; closing the
        iterator early aborts the request)."""
        rid = self.add_request(self.encode(prompt), params)
        finished = False
        try:
            while not finished:
                for ev in self.step():
                    if ev.request_id == rid:
                        finished = ev.finished
                        if ev.finish_reason == "error":
                            raise RequestFailedError(rid, ev.error or "unknown error")
                        yield ev
        finally:
            if not finished:
                self.abort(rid)
                self._aborted = [e for e in self._aborted if e.request_id != rid]
