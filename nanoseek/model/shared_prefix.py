"""A training forward for many continuations of a few shared prefixes: GRPO's G completions of
each prompt.

The plain way runs every (prompt + completion) row through the model right-padded, so a
prompt's tokens are projected, normalised and sent through the MoE G times, to produce G
identical hidden states, and every row pays for the longest completion's length. Here:

* each distinct prompt runs once; its keys and values are shared by its G completions, whose
  queries attend to [the prompt's keys ; their own keys, causally];
* every real token of the batch — each distinct prompt's, then each completion's — sits once in
  one flat (1, M, D) sequence for everything that is per token (norms, projections, the MoE), so
  nothing there is padding; only attention gathers the tokens into padded (prompts, Lp) and
  (rows, C) blocks and scatters its output back.

The math is the plain forward's (same positions, same attention; the gradients of the G
completions sum in the one copy of the prompt, as they would over G copies). A prompt's padding
is hidden from its completions by a key bias; right padding is behind every real query anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import MLA, causal_attention


@dataclass
class SharedPrefixBatch:
    """Index tensors of the flat layout (built by `of`). M real tokens: the U prompts' (padded
    to Lp in attention), then the N continuations' (padded to C)."""
    tokens: torch.Tensor        # (M,) ids
    positions: torch.Tensor     # (M,)
    prompt_slots: torch.Tensor  # (U, Lp) flat index of each prompt position (padding: 0)
    row_slots: torch.Tensor     # (N, C) flat index of each continuation position (padding: 0)
    unpad: torch.Tensor         # (M,) each flat token's place in the padded [U·Lp ; N·C] blocks
    key_bias: torch.Tensor      # (N, Lp + C) 0 / −inf: the prompt padding a continuation must not see
    group: torch.Tensor         # (N,) which prompt each row continues
    last: torch.Tensor          # (U,) flat index of each prompt's last token

    @classmethod
    def of(cls, prompts: list[list[int]], rows: list[list[int]], group: list[int], device) -> "SharedPrefixBatch":
        """prompts: the distinct prefixes; rows[i]: the tokens that continue prompts[group[i]]
        (may be empty)."""
        U, N = len(prompts), len(rows)
        Lp, C = max(map(len, prompts)), max(1, max(map(len, rows)))
        tokens = [t for p in prompts for t in p] + [t for r in rows for t in r]
        positions = [j for p in prompts for j in range(len(p))]
        positions += [len(prompts[g]) + j for r, g in zip(rows, group) for j in range(len(r))]
        prompt_slots, row_slots, unpad, last = [], [], [], []
        at = 0
        for u, p in enumerate(prompts):
            prompt_slots.append([at + j if j < len(p) else 0 for j in range(Lp)])
            unpad += [u * Lp + j for j in range(len(p))]
            at += len(p)
            last.append(at - 1)
        for i, r in enumerate(rows):
            row_slots.append([at + j if j < len(r) else 0 for j in range(C)])
            unpad += [U * Lp + i * C + j for j in range(len(r))]
            at += len(r)
        lens = torch.tensor([len(prompts[g]) for g in group], device=device)
        key_bias = torch.zeros(N, Lp + C, device=device)
        key_bias[:, :Lp].masked_fill_(torch.arange(Lp, device=device)[None] >= lens[:, None], float("-inf"))
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        return cls(t(tokens), t(positions), t(prompt_slots), t(row_slots), t(unpad), key_bias, t(group), t(last))


def shared_prefix_hidden_states(model, b: SharedPrefixBatch) -> torch.Tensor:
    """The batch's M flat tokens through every layer → final hidden states before the last
    norm, (M, D), in the order of `b.tokens`."""
    if int(b.positions.max()) >= model.config.max_position_embeddings:
        raise ValueError(f"position {int(b.positions.max())} is beyond max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    cos, sin = model.rotary(b.positions[None])
    h = model.embed_tokens(b.tokens)[None]
    for layer in model.layers:
        h = h + _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, b)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h[0]


def _attention(attn: MLA, x, cos, sin, b: SharedPrefixBatch) -> torch.Tensor:
    """MLA's expanded attention (eqs. 10–11: keys and values up-projected from the latent) for
    the flat layout: the prompts attend causally to themselves, each continuation to its
    prompt's keys and values (gathered by `group`) and then to its own."""
    H, dn, dr, dv = attn.n_heads, attn.dn, attn.dr, attn.dv
    q_nope, q_pe, c_kv, k_pe = attn.projections(x, cos, sin)  # (1, H, M, ·), (1, M, ·)
    M = c_kv.shape[1]
    kv = attn.kv_b_proj(c_kv[0]).view(M, H, dn + dv)  # every token up-projected once
    # q | k | v side by side per token and head, so each padded block is one gather
    qkv = torch.cat((q_nope[0].transpose(0, 1), q_pe[0].transpose(0, 1), kv[..., :dn],
                     k_pe[0, :, None].expand(M, H, dr), kv[..., dn:]), -1)  # (M, H, 2·(dn+dr) + dv)

    # (index_select, not qkv[slots]: its backward is an index_add_, advanced indexing's a slow index_put_)
    def block(slots):  # (B, T) flat indices → q, k, v (B, H, T, ·)
        t = qkv.index_select(0, slots.flatten()).unflatten(0, slots.shape).transpose(1, 2)
        return t.split([dn + dr, dn + dr, dv], -1)

    qp, kp, vp = block(b.prompt_slots)
    qc, kc, vc = block(b.row_slots)
    op = causal_attention(qp, kp, vp, attn.scale)
    kg, vg = kp.index_select(0, b.group), vp.index_select(0, b.group)
    oc = causal_attention(qc, torch.cat((kg, kc), 2), torch.cat((vg, vc), 2), attn.scale, b.key_bias)
    out = torch.cat((op.transpose(1, 2).reshape(-1, H * dv), oc.transpose(1, 2).reshape(-1, H * dv)))
    return attn.o_proj(out.index_select(0, b.unpad))[None]
