"""The distillation divergence: GKD's generalized Jensen-Shannon divergence (Agarwal et al.,
"On-Policy Distillation of Language Models", eq. 1), under TRL's name and conventions.

At each position the teacher's and the student's next-token distributions are compared over the
whole vocabulary, both softened by the same temperature τ:

    p_T = softmax(z_T / τ),  p_S = softmax(z_S / τ)
    β = 0:      KL(p_T ‖ p_S) = Σ_v p_T(v) (log p_T(v) − log p_S(v))      forward KL
    β = 1:      KL(p_S ‖ p_T)                                              reverse KL
    0 < β < 1:  JSD_β = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M),  M = β p_T + (1 − β) p_S

Why both ends are special-cased: JSD_β itself vanishes at β = 0 and β = 1 (M becomes one of the
two distributions), so there the divergence is the KL it tends to, as TRL's GKDTrainer does.
Forward KL makes the student cover every answer the teacher gives weight to (mean-seeking);
reverse KL makes it put its mass where the teacher's is highest (mode-seeking), which is what
on-policy distillation uses on the student's own samples.

The loss is the divergence summed over the vocabulary and averaged over the positions whose
label is not -100 — the same positions SFT's cross-entropy trains (assistant tokens), so the
prompt is never distilled.
"""
from __future__ import annotations

import math

import torch


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) over the last dim, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """The per-position divergence (…,) of the module docstring, for logits (…, V)."""
    log_s = (student_logits.float() / temperature).log_softmax(-1)
    log_t = (teacher_logits.float() / temperature).log_softmax(-1)
    if beta == 0:
        return kl(log_t, log_s)
    if beta == 1:
        return kl(log_s, log_t)
    # log M = log(β p_T + (1 − β) p_S), computed in log space
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
    return beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: torch.Tensor | None = None, beta: float = 0.5,
                         temperature: float = 1.0) -> torch.Tensor:
    """Mean generalized JSD over the positions with labels != -100 (all positions without labels).

    student_logits, teacher_logits: (B, T, V); labels: (B, T), position i's label is the token
    position i predicts. The masked positions are dropped before the softmax, so prompt tokens
    and padding cost nothing."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if labels is not None:
        keep = labels != -100
        student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]
    div = generalized_jsd(student_logits, teacher_logits, beta, temperature)
    return div.sum() / max(div.numel(), 1)
