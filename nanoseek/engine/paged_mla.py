"""The engine's forward: absorbed MLA over the paged latent cache, with the weights pre-folded.

Every token a step computes — decode rows, draft-verification rows, prefill chunks of any length,
and the multi-token-prediction modules' drafts — goes through this one functional twin of
`DeepSeekV3.hidden_states`, over the flat real tokens of the step. It reads and writes only the
paged cache's latents [c_kv ; k_pe] (docs/deepseek.md, MLA), and cuts the ops without changing the math:

* W_UK is folded into the query up-projection once (q_abs = h·(W_UK^T W_Q,nope)^T), and W_UV into
  o_proj (W_O W_UV) — MLA's absorption (docs/deepseek.md), done at load time instead of every step;
* every RMSNorm whose output only feeds matmuls has its gain (and √d) folded into those matmuls
  (W·(g ⊙ x̂) = (W·diag g)·x̂): the input norms, q's norm, the router, the experts, the lm_head,
  and an MTP module's two input norms and its head norm; what is left of a norm is one vecdot
  and an rsqrt;
* RoPE costs two in-place ops: the projections emit the rope dims already de-interleaved
  ([evens; odds], the layout apply_rope writes) plus a half-swapped copy ([odds; evens]), so
  rope(x) = x·[cos; cos] + swap(x)·[−sin; sin], with the tables built once per step;
* the cache keeps [c_kv ; k_pe] side by side, so q_abs·c_kv + q_pe·k_pe is one batched matmul
  against the gathered latents: scores = [q_abs ; q_pe] · [c_kv ; k_pe]^T;
* the query and latent down-projections share one matmul; so do each SwiGLU's gate and up;
  weights are stored transposed so each product is a single mm/addmm, and residual adds ride
  on addmm (for one token, each expert's gate weight is addmm's alpha);
* the router's gate values come from `moe.Router.route` on logits of the folded router weight;
  a single token then visits only its k routed experts;
* projections, norms and the MoE run on the N real tokens; only attention pads, per group of
  rows of similar length (`AttnGroup`), and a long prompt's queries attend in blocks, each
  scored only against the keys up to its own last row, so the score tensor stays small;
* the latents are gathered into a buffer kept across steps: a fresh multi-MB tensor every layer
  costs page faults that, on a CPU, took longer than the gather itself;
* an int8/int4 checkpoint (`model.quantization`, set by the loader) has every folded matrix but
  the router's and the head's packed for an integer kernel (nanoseek/compress/kernels.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.moe import MoE

_SMALL = 64 * 2**20  # bytes: extra copies of weights (stacked experts, lm_head) only below this


def _t(w: torch.Tensor, dtype) -> torch.Tensor:
    return w.t().contiguous().to(dtype)


# x·W for an engine matrix W: a transposed (in, out) tensor, or one packed for an integer kernel
# (an int8/int4 checkpoint: nanoseek/compress/kernels.py)
def _mm(x, w):
    return torch.mm(x, w) if isinstance(w, torch.Tensor) else w.mm(x)


def _addmm(h, x, w, alpha: float = 1.0):
    """h + alpha·x·W (out of place)."""
    if isinstance(w, torch.Tensor):
        return torch.addmm(h, x, w, alpha=alpha)
    return h.add(w.mm(x), alpha=alpha)


def _addmm_(h, x, w, alpha: float = 1.0):
    """h += alpha·x·W."""
    if isinstance(w, torch.Tensor):
        return h.addmm_(x, w, alpha=alpha)
    return h.add_(w.mm(x), alpha=alpha)


def _fold_layer(layer, c, dt) -> dict:
    """A DecoderLayer's weights folded for the absorbed forward (see the module docstring)."""
    a = layer.self_attn
    H, r, dr, dn, dv = (c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim)
    ev = torch.arange(0, dr, 2)
    perm = torch.cat((ev, ev + 1))  # interleaved pairs → [evens; odds]
    swap = torch.cat((ev + 1, ev))  # → [odds; evens]
    g1 = layer.input_layernorm.weight.double() * c.hidden_size ** 0.5
    w_uk, w_uv = (w.double() for w in a._w_uk_uv())  # (H, dn, r), (H, dv, r)
    wq = (a.q_b_proj if hasattr(a, "q_b_proj") else a.q_proj).weight.double().view(H, dn + dr, -1)
    q_abs = torch.einsum("hdr,hdi->hri", w_uk, wq[:, :dn])  # (H, r, in): W_UK^T · W_Q,nope
    q_pe = wq[:, dn:]
    q_main = torch.cat((q_abs, q_pe[:, perm]), dim=1).reshape(H * (r + dr), -1)
    q_alt = q_pe[:, swap].reshape(H * dr, -1)
    kv = a.kv_a_proj_with_mqa.weight.double()
    kv_rows = [kv[:r], kv[r:][perm], kv[r:][swap]]  # c_kv | k_pe | swapped k_pe
    if hasattr(a, "q_a_proj"):
        w_in = torch.cat([a.q_a_proj.weight.double()] + kv_rows) * g1
        wq_all = torch.cat((q_main, q_alt)) * a.q_a_layernorm.weight.double() * c.q_lora_rank ** 0.5
        split = [a.q_a_proj.weight.shape[0], r + dr, dr]
        q_split = [H * (r + dr), H * dr]
    else:
        w_in = torch.cat([q_main, q_alt] + kv_rows) * g1
        wq_all = None
        split = [H * (r + dr), H * dr, r + dr, dr]
        q_split = None
    # attention biases (attention_bias): the first projections' in w_in's row order (the
    # input norm's gain does not touch them; q_proj has none), o_proj's added after wo
    b_in = None
    if a.kv_a_proj_with_mqa.bias is not None:
        kvb = a.kv_a_proj_with_mqa.bias.double()
        qb = a.q_a_proj.bias.double() if hasattr(a, "q_a_proj") else kvb.new_zeros(H * (r + 2 * dr))
        b_in = torch.cat((qb, kvb[:r], kvb[r:][perm], kvb[r:][swap])).to(dt)
    wo = a.o_proj.weight.double().view(-1, H, dv)
    wo_fold = torch.einsum("dhv,hvr->dhr", wo, w_uv).reshape(wo.shape[0], H * r)
    mlp = layer.mlp
    g2 = layer.post_attention_layernorm.weight.double() * c.hidden_size ** 0.5
    moe = mlp if isinstance(mlp, MoE) else None
    ffn = mlp.shared_experts if moe is not None else mlp
    # every matrix stored transposed, (in, out) contiguous: torch.mm/addmm on it is one op
    # (F.linear is four: linear → t → matmul → mm), and for one token the (1, in)·(in, out)
    # product streams whole rows
    L = dict(w_in=_t(w_in, dt), b_in=b_in, split=split, q_split=q_split,
             wq=None if wq_all is None else _t(wq_all, dt),
             # the latent's norm: its gain and √r in one multiply with the rope's cos
             kv_gain=(a.kv_a_layernorm.weight.double() * r ** 0.5).to(dt), wo=_t(wo_fold, dt), scale=a.scale,
             bo=a.o_proj.bias,
             gate_up=None if ffn is None else _t(torch.cat((ffn.gate_proj.weight, ffn.up_proj.weight)).double()
                                                 * g2, dt),
             down=None if ffn is None else ffn.down_proj.weight.t(), moe=None)
    if moe is not None:
        ex = moe.experts
        # experts' gate and up stacked (one matmul per expert), the norm's gain folded in:
        # a copy, so only when it is small (laptop-sized models); otherwise views
        small = ex.gate_proj.numel() * 3 * ex.gate_proj.element_size() <= _SMALL
        E = ex.gate_proj.shape[0]
        L["moe"] = dict(
            router=_t(moe.gate.weight.double() * g2, torch.float32),
            route=moe.gate,  # the Router module: its scoring, expert choice and gate values
            gu=[_t(torch.cat((ex.gate_proj[e], ex.up_proj[e])).double() * g2, dt) for e in range(E)]
            if small else None,
            gate=None if small else [ex.gate_proj[e].t() for e in range(E)],
            up=None if small else [ex.up_proj[e].t() for e in range(E)], g2=g2.to(dt),
            down=[_t(ex.down_proj[e], dt) if small else ex.down_proj[e].t() for e in range(E)])
    return L


def _head(lm_head: torch.Tensor, gain: torch.Tensor) -> torch.Tensor | None:
    """A norm's gain folded into a transposed lm_head copy, when small: a (1, D)·(D, V) matmul
    streams contiguous rows, ~2× faster than (1, D)·(V, D)ᵀ on CPU for one token."""
    if lm_head.numel() * lm_head.element_size() > _SMALL:
        return None
    return (lm_head.double() * gain.double()).t().contiguous().to(lm_head.dtype)


class PagedMLA:
    """Pre-folded weights of a DeepSeekV3 (its layers and its MTP modules), and their forward
    over the paged latent cache: layer i of the cache is main layer i, layer L + j is MTP module j."""

    @torch.no_grad()
    def __init__(self, model):
        self.model = model
        c = self.cfg = model.config
        self.H, self.r, self.dr = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
        dt = model.embed_tokens.weight.dtype
        # d·ε per normalised width, as 0-dim tensors: adding a Python float wraps it into a new
        # tensor every call (four more ops per norm)
        self._deps = {d: torch.tensor(d * c.rms_norm_eps) for d in (c.hidden_size, c.kv_lora_rank, c.q_lora_rank) if d}
        self.layers = [_fold_layer(layer, c, dt) for layer in model.layers]
        self.norm = (model.norm.weight.double() * c.hidden_size ** 0.5).to(dt)
        w = model.lm_head.weight
        self.head_t = _head(w, self.norm)
        # MTP module j (eq. 21): h'_j = M_j [RMSNorm(Emb(t)); RMSNorm(h_prev)], both norms' gains
        # (and √D) folded into M_j's two halves; then a decoder layer; then the shared head
        # behind the module's own norm
        D = c.hidden_size
        self.mtp = []
        for m in model.mtp:
            g = torch.cat((m.enorm.weight, m.hnorm.weight)).double() * D ** 0.5
            gain = (m.shared_head_norm.weight.double() * D ** 0.5).to(dt)
            self.mtp.append(dict(eh=_t(m.eh_proj.weight.double() * g, dt), layer=_fold_layer(m.block, c, dt),
                                 gain=gain, head_t=_head(w, gain)))
        if getattr(model, "quantization", None):  # an int8/int4 checkpoint: integer kernels
            from ..compress.kernels import pack_folded

            pack_folded(self, model.quantization)
        self._buf = None  # the gathered latents, reused across steps
        self._rope = None  # [cos; cos] and [−sin; sin] of positions 0 … n−1, computed as `rotary` does

    # ------------------------------------------------------------------ pieces
    def _rs(self, x):
        """1/√(Σx² + d·ε) (B, 1) fp32: RMSNorm's scale with its √d moved into the next weights
        (four ops; F.rms_norm runs ~7). An fp32 tensor is not even passed through .float():
        on a CPU step of ~400 ops every dispatch shows."""
        xf = x if x.dtype == torch.float32 else x.float()
        return (xf * xf).sum(-1, keepdim=True).add_(self._deps[x.shape[-1]]).rsqrt_()

    def _rms(self, x):
        """RMSNorm without its gain, times √d (both folded into the weights that read it)."""
        if x.dtype == torch.float32:
            return x * self._rs(x)
        return (x.float() * self._rs(x)).to(x.dtype)

    @staticmethod
    def _swiglu_h(x, gate_up):
        """silu(x·W_gate) ⊙ (x·W_up), in place in the left half of one matmul's output."""
        g, u = _mm(x, gate_up).chunk(2, 1)
        return F.silu(g, inplace=True).mul_(u)

    def _expert_h(self, x, M, e):
        if M["gu"] is not None:
            return self._swiglu_h(x, M["gu"][e])
        xg = x * M["g2"]  # big models: the gain applied here instead of into a copy
        return F.silu(_mm(xg, M["gate"][e])) * _mm(xg, M["up"][e])

    def _moe(self, h: torch.Tensor, x: torch.Tensor, L: dict) -> torch.Tensor:
        """h + shared expert(x) + Σ_k g_k · expert_k(x), accumulated by addmm/index_add_ (h, the
        step's own residual, may be updated in place)."""
        M = L["moe"]
        w, idx, _ = M["route"].route(torch.mm(x if x.dtype == torch.float32 else x.float(), M["router"]))
        down = M["down"]
        if L["gate_up"] is not None:
            h = _addmm(h, self._swiglu_h(x, L["gate_up"]), L["down"])
        N = x.shape[0]
        if N <= 4:  # a few tokens (decode, draft verification): each visits its own k experts, its
            # gates as Python floats (addmm's alpha) — fewer ops than grouping tokens by expert
            rows = zip(x.chunk(N), h.chunk(N)) if N > 1 else [(x, h)]
            for (xt, ht), es, gs in zip(rows, idx.tolist(), w.tolist()):
                for e, g in zip(es, gs):
                    _addmm_(ht, self._expert_h(xt, M, e), down[e], alpha=g)
            return h
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert, as Experts.forward
        token = order // k
        xs = x.index_select(0, token).split_with_sizes(torch.bincount(flat, minlength=len(down)).tolist())
        outs = [_mm(self._expert_h(xe, M, e), down[e]) for e, xe in enumerate(xs) if xe.shape[0]]
        y = torch.cat(outs) * w.reshape(-1)[order, None].to(x.dtype)  # (no-op for fp32)
        return h.index_add_(0, token, y)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head → fp32 logits (B, V)."""
        return self._head(h, self.head_t, self.norm)

    def mtp_logits(self, j: int, h: torch.Tensor) -> torch.Tensor:
        """MTP module j's output h → its prediction (eq. 23): the shared head behind its own norm."""
        M = self.mtp[j]
        return self._head(h, M["head_t"], M["gain"])

    def _head(self, h, head_t, gain):
        z = torch.mm(self._rms(h), head_t) if head_t is not None else \
            F.linear(self._rms(h) * gain, self.model.lm_head.weight)
        return z if z.dtype == torch.float32 else z.float()

    # ------------------------------------------------------------------ the forward
    def _rope_tables(self, n: int, dt, dev):
        """RoPE's cos and sin laid out for [evens; odds] and its swapped copy, for positions
        0 … n−1 (the model's own `rotary` on them, so a step reads exactly its values)."""
        if self._rope is None or self._rope[0].shape[0] < n or self._rope[0].dtype != dt or self._rope[0].device != dev:
            n = max(n, min(4 * n, self.cfg.max_position_embeddings))  # grown in few steps
            cos, sin = self.model.rotary(torch.arange(n, device=dev))
            self._rope = torch.cat((cos, cos), -1).to(dt), torch.cat((-sin, sin), -1).to(dt)
        return self._rope

    def _prepare(self, pos, kv, groups, block_size, top: int):
        """RoPE tables for [evens; odds] and the swapped copy, once for all layers (`top`: the
        highest position); every group's gather plan into the kept latent buffer."""
        H, r, dr, dt = self.H, self.r, self.dr, kv.dtype
        cos_t, sin_t = self._rope_tables(top + 1, dt, kv.device)
        cos2, sin2 = cos_t.index_select(0, pos), sin_t.index_select(0, pos)
        rope = (cos2, sin2, cos2[:, None], sin2[:, None])
        n = max((g.table.numel() for g in groups), default=0) * block_size * (r + dr)
        if self._buf is None or self._buf.numel() < n or self._buf.dtype != dt or self._buf.device != kv.device:
            self._buf = torch.empty(n, dtype=dt, device=kv.device)
        for g in groups:
            g.prepare(self._buf, block_size, r + dr, H, r)
        return rope

    def _layer(self, h, L, cache, write, groups, rope, block_size, keep=None):
        """One decoder layer over the flat tokens h (N, D): absorbed attention over `cache` (one
        layer of the paged cache, its new latents written to `write`), then the dense FFN or the
        MoE. With `keep`, only those rows go on past the latents (the groups are theirs): a
        module's last layer need not compute outputs nobody reads."""
        H, r, dr = self.H, self.r, self.dr
        N = h.shape[0]
        cos2, sin2, cos_q, sin_q = rope
        x = self._rms(h)
        parts = (_mm(x, L["w_in"]) if L["b_in"] is None else _addmm(L["b_in"], x, L["w_in"])
                 ).split_with_sizes(L["split"], -1)  # (Tensor.split is a Python wrapper)
        if L["wq"] is not None:
            a, lat, lat_alt = parts
            q, q_alt = _mm(self._rms(a), L["wq"]).split_with_sizes(L["q_split"], -1)
        else:
            q, q_alt, lat, lat_alt = parts
        q = q.view(N, H, r + dr)
        q[..., r:].mul_(cos_q).addcmul_(q_alt.view(N, H, dr), sin_q)
        # [c_kv ; k_pe] ← [c_kv·rs·gain ; k_pe·cos + swap(k_pe)·sin]
        rs = self._rs(lat[:, :r])
        if rs.dtype != lat.dtype:
            rs = rs.to(lat.dtype)
        lat.mul_(torch.cat((L["kv_gain"] * rs, cos2), -1))
        lat[:, r:].addcmul_(lat_alt, sin2)
        cache.index_copy_(0, write, lat)
        if keep is not None:
            if not keep.numel():
                return h[:0]
            q, h, N = q.index_select(0, keep), h.index_select(0, keep), keep.shape[0]
        blocks = cache.view(-1, block_size * (r + dr))
        if len(groups) == 1:
            o = groups[0].attend(q, blocks, L["scale"])
        else:
            o = q.new_empty(N, H * r)
            for g in groups:
                g.attend(q[g.t0:g.t1], blocks, L["scale"], out=o[g.t0:g.t1])
        h = _addmm(h, o, L["wo"])
        if L["bo"] is not None:
            h += L["bo"]
        x = self._rms(h)
        if L["moe"] is not None:
            return self._moe(h, x, L)
        return _addmm(h, self._swiglu_h(x, L["gate_up"]), L["down"])

    def hidden(self, ids: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor, write: torch.Tensor,
               groups: list["AttnGroup"], block_size: int, top: int) -> torch.Tensor:
        """Flat tokens — ids, pos, write slots (N,) — through every layer → hidden states (N, D),
        before the last norm. kv is the cache (layers, slots, r+dr); `top` the highest position.

        Everything but attention runs on the N real tokens (no padding). Attention runs per group
        of rows (`AttnGroup`): each row's queries score, in latent space, every latent of its
        sequence, gathered from the paged cache a whole block at a time (one index per block:
        the per-token gather was the costliest op of a batched decode step)."""
        rope = self._prepare(pos, kv, groups, block_size, top)
        h = F.embedding(ids, self.model.embed_tokens.weight)
        for i, L in enumerate(self.layers):
            h = self._layer(h, L, kv[i], write, groups, rope, block_size)
        return h

    def mtp_hidden(self, j: int, h_prev: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor,
                   write: torch.Tensor, groups: list["AttnGroup"], block_size: int, top: int,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
        """MTP module j (0-based) on flat rows: the previous depth's representation h_prev (N, D)
        and the embedded next tokens ids (N,) → h^j (N, D) (eqs. 21–22), its latents in cache
        layer L + j; with `keep`, the outputs of those rows only (`groups` are their queries')."""
        M = self.mtp[j]
        rope = self._prepare(pos, kv, groups, block_size, top)
        e = F.embedding(ids, self.model.embed_tokens.weight)
        h = _mm(torch.cat((self._rms(e), self._rms(h_prev)), -1), M["eh"])
        return self._layer(h, M["layer"], kv[len(self.layers) + j], write, groups, rope, block_size, keep)


DECODE_WASTE = 1.5  # rows of a few new tokens share one attention call while padding (by cache length) ≤ 50%
PREFILL_WASTE = 1.25  # prompt chunks share one while padding (by chunk length) ≤ 25%
SHORT = 8  # rows of at most this many new tokens (decode, draft verification, drafts) group by cache length


def pad_groups(items: list, waste: float, length) -> list[list]:
    """Items sorted by `length` and cut into groups whose padding costs at most `waste` times
    the real work (one attention call each: a little overhead, far less padding)."""
    groups: list[list] = []
    total = 0
    for c in sorted(items, key=length):
        n = length(c)
        if groups and (len(groups[-1]) + 1) * n <= waste * (total + n):
            groups[-1].append(c)
            total += n
        else:
            groups.append([c])
            total = n
    return groups


def attention_groups(items: list, start, count) -> list[list]:
    """Rows of a step (`start(x)`: the first new position, `count(x)`: how many) → the groups
    that attend together: short rows by the cache length they read, long ones by their length."""
    short = [x for x in items if count(x) <= SHORT]
    long = [x for x in items if count(x) > SHORT]
    return (pad_groups(short, DECODE_WASTE, lambda x: start(x) + count(x))
            + pad_groups(long, PREFILL_WASTE, count))


class AttnGroup:
    """Rows that attend together: tokens t0:t1 of the flat batch, `lens[i]` new tokens for row i
    at positions starts[i]…, over the blocks `table` (Bg, nb); columns before `lo` are never
    attended (an MTP module's first entries). Rows are padded to T = max(lens) only here; T = 1
    (decode) needs no padding at all."""

    max_scores = 1 << 22  # elements of one (B, t·H, S) score block; longer prompts attend in query blocks

    def __init__(self, t0: int, lens: list[int], starts: list[int], table: torch.Tensor, lo: int = 0):
        self.t0, self.t1 = t0, t0 + sum(lens)
        self.B, self.T = len(lens), max(lens)
        self.lens, self.starts, self.table, self.lo = lens, starts, table, lo

    def prepare(self, buf: torch.Tensor, block_size: int, width: int, H: int, r: int) -> None:
        dev = self.table.device
        self.r = r
        B, T = self.B, self.T
        self.S = S = self.table.shape[1] * block_size
        self.flat = self.table.reshape(-1)
        self.buf = buf[:self.flat.shape[0] * block_size * width].view(self.flat.shape[0], block_size * width)
        cols = torch.arange(S, device=dev)
        if T == 1:
            self.dst = None
            last = torch.tensor(self.starts, device=dev)
            seen = cols <= last[:, None]
            if self.lo:
                seen &= cols >= self.lo
            self.neg = torch.where(seen, 0.0, float("-inf"))[:, None]  # (B, 1, S)
            return
        # padded slot of each real token (False: every row is T long, the tokens are the padded
        # layout already), and every padded query's last visible column (padding sees all
        # columns: its output is dropped, it just must not be an all −inf row)
        tb = max(1, self.max_scores // (B * H * S))
        if tb >= T and all(n == T for n in self.lens):
            self.dst = False
        else:
            self.dst = torch.tensor([i * T + t for i, n in enumerate(self.lens) for t in range(n)], device=dev)
        last = torch.tensor([[s + t if t < n else S for t in range(T)] for s, n in zip(self.starts, self.lens)],
                            device=dev)
        neg = torch.where((cols <= last[..., None]) & (cols >= self.lo), 0.0, float("-inf"))  # (B, T, S)
        if tb >= T:  # one block: the mask pre-expanded over heads, added inside baddbmm
            self.qblocks = None
            self.neg = neg[:, :, None].expand(B, T, H, S).reshape(B, T * H, S)
            return
        # query blocks [a, b), each against the columns up to its last real row's (causal: the
        # rest would be −inf)
        self.qblocks = []
        for a in range(0, T, tb):
            b = min(T, a + tb)
            e = min(S, max(s + min(b, n) for s, n in zip(self.starts, self.lens)))
            self.qblocks.append((a, b, e, neg[:, a:b, None, :e]))

    def attend(self, q: torch.Tensor, blocks: torch.Tensor, scale: float, out: torch.Tensor | None = None
               ) -> torch.Tensor:
        """q (n, H, r+dr) of this group's tokens, the cache layer as blocks (num_blocks, bs·(r+dr))
        → the softmax-weighted latents (n, H·r)."""
        B, T, S, r = self.B, self.T, self.S, self.r
        n, H, w = q.shape
        lat = torch.index_select(blocks, 0, self.flat, out=self.buf).view(B, S, w)
        if self.dst is None:  # decode: (B, H, r) rows are already the tokens' rows
            p = self._probs(q, lat, self.neg, scale)
            if out is None:
                return torch.bmm(p, lat[..., :r]).view(B, H * r)
            return torch.bmm(p, lat[..., :r], out=out.view(B, H, r)).view(B, H * r)
        if self.dst is False:  # every row T long: the tokens are already the padded layout
            p = self._probs(q.reshape(B, T * H, w), lat, self.neg, scale)
            if out is None:
                return torch.bmm(p, lat[..., :r]).view(n, H * r)
            return torch.bmm(p, lat[..., :r], out=out.view(B, T * H, r)).view(n, H * r)
        qg = q.new_zeros(B * T, H, w).index_copy_(0, self.dst, q).view(B, T * H, w)
        if self.qblocks is None:
            o = torch.bmm(self._probs(qg, lat, self.neg, scale), lat[..., :r]).view(B * T, H * r)
        else:
            o = q.new_empty(B, T, H, r)
            for a, b, e, neg in self.qblocks:
                s = torch.bmm(qg[:, a * H:b * H], lat[:, :e].transpose(1, 2)).float().mul_(scale)
                p = s.view(B, b - a, H, e).add_(neg).softmax(-1).to(q.dtype).view(B, (b - a) * H, e)
                o[:, a:b] = torch.bmm(p, lat[:, :e, :r]).view(B, b - a, H, r)
            o = o.view(B * T, H * r)
        return o.index_select(0, self.dst) if out is None else torch.index_select(o, 0, self.dst, out=out)

    @staticmethod
    def _probs(q, lat, neg, scale):
        if q.dtype == torch.float32:
            scores = torch.baddbmm(neg, q, lat.transpose(1, 2), alpha=scale)
        else:
            scores = torch.bmm(q, lat.transpose(1, 2)).float() * scale + neg
        return scores.softmax(-1).to(q.dtype)
