"""Speculative decoding with the multi-token-prediction modules as the draft (V3 paper §5.4.3).

A request that decodes carries k draft tokens d_1…d_k. One forward of the main model over
[x_N, d_1, …, d_k] gives the target distribution p_0…p_k at once; the longest prefix of drafts
the target agrees with is kept, plus one token of the target's own, so a step emits 1…k+1
tokens and the text is exactly what the target alone would write:

* greedy: d_i is kept while it is the target's argmax; the first disagreement is replaced by the
  argmax, and when all agree the argmax after d_k is the bonus token;
* sampling (Leviathan et al. 2023; Chen et al. 2023): d_i, drawn from the draft distribution q_i,
  is kept with probability min(1, p_i(d_i) / q_i(d_i)); on the first rejection the token is drawn
  from norm(max(0, p_i − q_i)), and when all are kept the bonus token is drawn from p_k. Every
  emitted token is then distributed exactly as p — the target after penalties, temperature,
  top-k and top-p, which are applied to q the same way.

A request with an allowed-token constraint (a grammar, token healing: nanoseek/engine/constraints.py)
drafts nothing — its drafts would have to be masked and verified against a constraint state
advanced through each draft — so its steps decode one token each, beside requests that draft.

Each draw reads a uniform hashed from (the request's seed, the output position, a stream): the
draft (stream 1), its acceptance test (stream 2), the final token (stream 0, the ordinary
sampling stream), so a seeded request is reproducible alone or in any batch.

The drafts come from the MTP modules (`Drafter`). Module j (1-based) has its own layer in the
paged latent cache; its entry in the slot of token t_q is computed from the previous depth's
representation one slot earlier (the main model's hidden state for j = 1) and Emb(t_q), at RoPE
position q − j — eq. 21's chain, in the slots of the tokens it embeds. So an entry depends on
tokens 0…q only: a full block's MTP entries are as shareable by the prefix cache as its main
latents. After the verifying forward, each module fills the slots of the newly accepted tokens
and drafts one token further: module j drafts d_j, and for k > D the last module is run again on
its own output (as vLLM does with one MTP layer), each step one slot further.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .paged_mla import AttnGroup, attention_groups
from .sampling import inverse_cdf, penalised, probs, uniforms

# the `--speculative-tokens` flag of every command that runs the engine (generate, chat, serve, eval, grpo)
SPECULATIVE_TOKENS_HELP = ("draft tokens per step from the MTP module(s), verified in one forward: the same text "
                           "under greedy decoding, the same distribution under sampling (0 = off)")


def check_speculative_tokens(k: int) -> None:
    """The flag's one check, as one line naming it."""
    if k < 0:
        raise ValueError(f"--speculative-tokens {k}: must be ≥ 0 (0 = off)")


DRAFT, ACCEPT = 1, 2  # uniform streams; the final token reads the ordinary stream 0


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, n_drafts: torch.Tensor,
                  u_accept: torch.Tensor, u_final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling for B rows at once.

    p (B, k+1, V): the target's distributions after each prefix [x, d_1…d_j]; q (B, k, V): the
    draft distributions d_1…d_k were drawn from; drafts (B, k); n_drafts (B,): how many of a
    row's k drafts are real; u_accept (B, k): the uniform of each draft's test; u_final (B, k+1):
    the uniform of the final token, by where it falls.
    → (accepted (B,): the number of leading drafts kept, final (B,): the token after them)."""
    B, k = drafts.shape
    dev = p.device
    rows = torch.arange(B, device=dev)
    if k == 0:
        return torch.zeros(B, dtype=torch.long, device=dev), inverse_cdf(p[:, 0], u_final[:, 0])
    pd = p[:, :k].gather(2, drafts[..., None])[..., 0]
    qd = q.gather(2, drafts[..., None])[..., 0]
    # keep d_i with probability min(1, p/q): u < p/q, i.e. u·q < p (q(d) > 0: d was drawn from q)
    ok = (u_accept * qd < pd) & (torch.arange(k, device=dev) < n_drafts[:, None])
    n = ok.long().cumprod(1).sum(1)
    pj = p[rows, n]
    rejected = (n < n_drafts)[:, None]
    residual = (pj - q[rows, n.clamp(max=k - 1)]).clamp_(min=0)
    # p = q exactly leaves no residual mass (and then no rejection either); guard the rounding
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, pj)
    return n, inverse_cdf(torch.where(rejected, residual, pj), u_final[rows, n])


def verify(logits: torch.Tensor, reqs: list, counts: list[int]) -> tuple[list[int], list[list[int]]]:
    """The target's logits of the verifying rows, request by request (`counts[i]` = 1 + its
    drafts; row j predicts the token after x_N, d_1…d_j) → per request: how many drafts it
    keeps, and the tokens it emits (those drafts and the token after them)."""
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)
    states = [r.sampler for r, c in zip(reqs, counts) for _ in range(c)]
    x = penalised(logits, states, [r.drafts[:j] for r, c in zip(reqs, counts) for j in range(c)])
    n_acc = [0] * len(reqs)
    final = [0] * len(reqs)
    greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
    sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if greedy:
        g = x.argmax(-1).tolist()
        for i in greedy:
            r, o, n = reqs[i], offs[i], 0
            while n < counts[i] - 1 and r.drafts[n] == g[o + n]:
                n += 1
            n_acc[i], final[i] = n, g[o + n]
    if sampled:
        dev = logits.device
        k = max(counts[i] for i in sampled) - 1
        idx = [offs[i] + j for i in sampled for j in range(counts[i])]
        pr = probs(x[idx], [states[t] for t in idx])
        V = pr.shape[-1]
        zero = pr.new_zeros(1, V)
        # (S, k+1) and (S, k) layouts, padded past a request's own drafts with a zero row
        at, p_rows, q_list, q_rows, drafts, seeds, steps = 0, [], [], [], [], [], []
        for i in sampled:
            r, c = reqs[i], counts[i]
            p_rows.append([at + j if j < c else len(idx) for j in range(k + 1)])
            at += c
            q_rows.append([len(q_list) + j if j < c - 1 else -1 for j in range(k)])
            q_list += r.draft_probs[:c - 1]
            drafts.append(r.drafts[:c - 1] + [0] * (k - c + 1))
            seeds.append(r.sampler.seed)
            steps.append(r.sampler.step)
        p = torch.cat((pr, zero))[torch.tensor(p_rows, device=dev)]
        q = torch.cat((torch.stack(q_list).to(pr), zero))[torch.tensor(q_rows, device=dev)]  # every row has drafts
        # output positions step … step + k: the tests of d_1 … d_k and the final token's draw
        ua = uniforms([sd for sd in seeds for _ in range(k)], [t + j for t in steps for j in range(k)], ACCEPT)
        uf = uniforms([sd for sd in seeds for _ in range(k + 1)], [t + j for t in steps for j in range(k + 1)])
        n, tok = accept_drafts(p, q, torch.tensor(drafts, device=dev).view(len(sampled), k),
                               torch.tensor([counts[i] - 1 for i in sampled], device=dev),
                               ua.view(-1, k).to(dev), uf.view(-1, k + 1).to(dev))
        for i, a, t in zip(sampled, n.tolist(), tok.tolist()):
            n_acc[i], final[i] = a, t
    return n_acc, [r.drafts[:n] + [t] for r, n, t in zip(reqs, n_acc, final)]


@dataclass(eq=False)
class Fill:
    """One request's MTP work after a step's main forward: the slots c+1 … c+m of the tokens
    `tokens` (x_{c+1} … x_{c+m}, whose predecessors' main hidden states are rows `hrows` of the
    step's forward), then `k` drafts. `emitted`: the tokens this step emits (the drafts'
    penalties count them). The results — drafts, their distributions, each module's last real
    output — are committed by the engine only when the whole step has succeeded."""

    r: object
    c: int
    hrows: list[int]
    tokens: list[int]
    k: int
    emitted: list[int]
    drafts: list[int] = field(default_factory=list)
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # (V,) each; sampled requests only
    mtp_h: list[torch.Tensor] = field(default_factory=list)


class Drafter:
    """Runs the MTP modules over the paged cache: fills their entries for the step's new tokens
    and drafts each request's next k tokens (module j drafts d_j; past the last module, that
    module again on its own output)."""

    def __init__(self, paged, cache, block_size: int, k: int):
        self.paged, self.cache, self.bs, self.k = paged, cache, block_size, k
        self.depth = min(k, len(paged.mtp))  # the modules used: drafts past k would be wasted

    def _forward(self, j: int, fills: list[Fill], spans: list[tuple[int, int]], table: torch.Tensor,
                 src: list[list[int]], tokens: list[list[int]], wanted: list[tuple[int, int] | None]
                 ) -> tuple[torch.Tensor, list[dict[int, int]]]:
        """Module j over each fill's slots lo…hi — its input rows `src[i]` of `table`, its tokens
        `tokens[i]` — writing every slot's latents, and computing outputs only for the slots
        a…b of `wanted[i]` (None: none) → those outputs and, per fill, slot → output row."""
        dev, bs = table.device, self.bs
        ids, rows, pos, write, first = [], [], [], [], []
        for f, (lo, hi), s, t in zip(fills, spans, src, tokens):
            first.append(len(ids) - lo)
            ids += t
            rows += s
            pos += range(lo - j - 1, hi - j)  # module j's entry in slot q sits at position q − j − 1 (eq. 21)
            write += [f.r.slot(q, bs) for q in range(lo, hi + 1)]
        keep, groups, at = [], [], [{} for _ in fills]
        asking = [i for i, w in enumerate(wanted) if w is not None]
        for g in attention_groups(asking, lambda i: wanted[i][0], lambda i: wanted[i][1] - wanted[i][0] + 1):
            nb = -(-max(wanted[i][1] + 1 for i in g) // bs)
            tab = torch.tensor([(fills[i].r.blocks + [0] * nb)[:nb] for i in g], device=dev)
            groups.append(AttnGroup(len(keep), [wanted[i][1] - wanted[i][0] + 1 for i in g], [wanted[i][0] for i in g],
                                    tab, lo=j + 1))
            for i in g:
                for q in range(wanted[i][0], wanted[i][1] + 1):
                    at[i][q] = len(keep)
                    keep.append(first[i] + q)
        ids_t, pos_t, write_t, rows_t = torch.tensor([ids, pos, write, rows], device=dev)
        out = self.paged.mtp_hidden(j, table.index_select(0, rows_t), ids_t, pos_t, self.cache.kv, write_t, groups,
                                    bs, max(pos), None if keep == list(range(len(ids))) else torch.tensor(keep, device=dev))
        return out, at

    def _draft(self, j: int, out: torch.Tensor, fills: list[Fill]) -> None:
        """Module j's outputs (one row per drafting fill) → each fill's next draft: the argmax, or
        drawn from its request's sampling distribution (penalties counting what came before it),
        which is kept with it for the verification."""
        x = self.paged.mtp_logits(j, out)
        states = [f.r.sampler for f in fills]
        x = penalised(x, states, [f.emitted + f.drafts for f in fills])
        tokens = x.argmax(-1).tolist()
        sampled = [i for i, f in enumerate(fills) if not f.r.params.greedy]
        q = [None] * len(fills)
        if sampled:
            pr = probs(x[sampled], [states[i] for i in sampled])
            # output position of this draft: what the request has, what this step emits, the drafts before it
            t = [f.r.sampler.step + len(f.emitted) + len(f.drafts) for f in (fills[i] for i in sampled)]
            u = uniforms([fills[i].r.sampler.seed for i in sampled], t, DRAFT).to(x.device)
            for i, tok, row in zip(sampled, inverse_cdf(pr, u).tolist(), pr.unbind(0)):
                tokens[i], q[i] = tok, row
        for f, tok, row in zip(fills, tokens, q):
            f.drafts.append(tok)
            if row is not None:
                f.draft_probs.append(row)

    def run(self, fills: list[Fill], h: torch.Tensor) -> None:
        """Fill every module's entries for the fills' new slots and draft; `h` holds the main
        model's hidden states of the step (rows named by `Fill.hrows`)."""
        if not fills or not self.depth:
            return
        # per fill: slot q → the row of `prev` holding module j's input for slot q (the output of
        # the depth below at slot q − 1; for module 1, the main model's hidden state)
        prev, inputs = h, [{f.c + 1 + i: row for i, row in enumerate(f.hrows)} for f in fills]
        lo = [f.c + 1 for f in fills]
        for j in range(self.depth):
            live, spans, src, tokens, kept, wanted = [], [], [], [], [], []
            for i, f in enumerate(fills):
                m = len(f.tokens)
                below = f.r.mtp_h[j - 1] if j and f.r.mtp_h else None  # the depth below's output at slot c
                if j:
                    lo[i] = f.c + 1 if below is not None else lo[i] + 1
                hi = f.c + m + (j if f.k > j else 0)
                if lo[i] > hi:  # nothing for this module yet (a short first chunk)
                    continue
                rows = []
                for q in range(lo[i], hi + 1):
                    if q in inputs[i]:
                        rows.append(inputs[i][q])
                    else:  # slot c + 1: the depth below's output kept from the step before
                        rows.append(prev.shape[0] + len(kept))
                        kept.append(below)
                live.append(i)
                spans.append((lo[i], hi))
                src.append(rows)
                tokens.append([f.tokens[q - f.c - 1] if q <= f.c + m else f.drafts[q - f.c - m - 1]
                               for q in range(lo[i], hi + 1)])
                # the next module reads every output; the last one's only draft is read
                wanted.append((lo[i], hi) if j < self.depth - 1 else (hi, hi) if f.k > j else None)
            outs = [{} for _ in fills]  # slot → row of module j's output
            if live:
                table = torch.cat((prev, torch.stack(kept))) if kept else prev
                out, got = self._forward(j, [fills[i] for i in live], spans, table, src, tokens, wanted)
                for i, d in zip(live, got):
                    outs[i] = d
            inputs = [{q + 1: row for q, row in d.items()} for d in outs]
            if j < self.depth - 1:  # kept for module j + 1's first slot of the next step
                for i, f in enumerate(fills):
                    row = outs[i].get(f.c + len(f.tokens))
                    f.mtp_h.append(None if row is None else out[row])
            drafting = [i for i in live if fills[i].k > j]
            if drafting:
                self._draft(j, out[[outs[i][fills[i].c + len(fills[i].tokens) + j] for i in drafting]],
                            [fills[i] for i in drafting])
            prev = out
        # past the last module: that module again, on its own last output and the newest draft
        j = self.depth - 1
        last = {i: outs[i][f.c + len(f.tokens) + j] for i, f in enumerate(fills) if f.k > j}
        for s in range(self.depth + 1, self.k + 1):
            live = [i for i, f in enumerate(fills) if f.k >= s]
            if not live:
                break
            sub = [fills[i] for i in live]
            spans = [(f.c + len(f.tokens) + s - 1,) * 2 for f in sub]
            out, got = self._forward(j, sub, spans, prev, [[last[i]] for i in live], [[f.drafts[-1]] for f in sub],
                                     spans)
            rows = [d[q] for d, (q, _) in zip(got, spans)]
            self._draft(j, out[rows], sub)
            prev, last = out, dict(zip(live, rows))
