"""A training forward for many continuations of a few shared prefixes: GRPO's G completions of
each prompt.

The plain way runs every (prompt + completion) row through the model, so a prompt's tokens are
projected, normalised and sent through the MoE G times, to produce G identical hidden states.
Here each distinct prompt runs once; its keys and values are then shared by its G completions,
whose queries attend to [the prompt's keys ; their own keys, causally]. The math is the plain
forward's (same positions, same attention), and gradients from all G completions flow back into
the one copy of the prompt, as they would sum over G copies.

Layout: every token of the batch — the U prompts right-padded to Lp, then the N completions
right-padded to C — sits in one flat (1, U·Lp + N·C, D) sequence for everything that is per token
(norms, projections, the MoE); only attention splits it back into prompts and continuations.
A prompt's padding (positions ≥ its length) is hidden from its completions by a key bias; the
padding's own hidden states are computed and never read.
"""

from __future__ import annotations

import torch

from .attention import MLA, causal_attention


def shared_prefix_hidden_states(model, prefix: torch.Tensor, prefix_lens: torch.Tensor, group: torch.Tensor,
                                ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """prefix (U, Lp) right-padded prompt ids and their lengths (U,); ids (N, C) right-padded
    continuation ids, row i continuing prompt group[i] at position prefix_lens[group[i]] →
    final hidden states before the last norm: prompts (U, Lp, D), continuations (N, C, D)."""
    U, Lp = prefix.shape
    N, C = ids.shape
    dev = prefix.device
    lens = prefix_lens[group]
    positions = torch.cat((torch.arange(Lp, device=dev).repeat(U), (lens[:, None] + torch.arange(C, device=dev)).flatten()))
    if int(positions.max()) >= model.config.max_position_embeddings:
        raise ValueError(f"position {int(positions.max())} is beyond max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    cos, sin = model.rotary(positions[None])
    # completion i sees its prompt's first lens[i] keys, then its own keys causally
    key_bias = torch.zeros(N, Lp + C, device=dev)
    key_bias[:, :Lp].masked_fill_(torch.arange(Lp, device=dev)[None] >= lens[:, None], float("-inf"))
    h = model.embed_tokens(torch.cat((prefix.flatten(), ids.flatten())))[None]
    for layer in model.layers:
        h = h + _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, (U, Lp), (N, C), group, key_bias)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    D = h.shape[-1]
    return h[0, :U * Lp].view(U, Lp, D), h[0, U * Lp:].view(N, C, D)


def _attention(attn: MLA, x, cos, sin, prompts: tuple[int, int], rows: tuple[int, int], group, key_bias):
    """MLA's expanded attention (eqs. 10–11: keys and values up-projected from the latent) for
    the flat layout: the prompts attend causally to themselves, each continuation to its
    prompt's keys and values (gathered by `group`) and then to its own."""
    (U, Lp), (N, C) = prompts, rows
    H, dn, dr, dv = attn.n_heads, attn.dn, attn.dr, attn.dv
    q_nope, q_pe, c_kv, k_pe = attn.projections(x, cos, sin)  # (1, H, M, ·), (1, M, ·)
    M = c_kv.shape[1]
    kv = attn.kv_b_proj(c_kv).view(M, H, dn + dv)  # every position up-projected once
    q = torch.cat((q_nope, q_pe), -1)[0]  # (H, M, dn + dr)
    k = torch.cat((kv[..., :dn], k_pe[0, :, None].expand(M, H, dr)), -1).transpose(0, 1)
    v = kv[..., dn:].transpose(0, 1)  # (H, M, dv)
    P = U * Lp

    def split(t):  # (H, M, d) → prompts (U, H, Lp, d), continuations (N, H, C, d)
        return (t[:, :P].unflatten(1, (U, Lp)).transpose(0, 1),
                t[:, P:].unflatten(1, (N, C)).transpose(0, 1))

    (qp, qc), (kp, kc), (vp, vc) = split(q), split(k), split(v)
    op = causal_attention(qp, kp, vp, attn.scale)
    oc = causal_attention(qc, torch.cat((kp[group], kc), 2), torch.cat((vp[group], vc), 2), attn.scale, key_bias)
    out = torch.cat((op.transpose(1, 2).reshape(P, H * dv), oc.transpose(1, 2).reshape(N * C, H * dv)))
    return attn.o_proj(out)[None]
