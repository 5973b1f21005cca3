"""The GRPO objective as pure tensor math (no model, no sampling), so every number is testable.

GRPO (DeepSeekMath, eq. 3): for a prompt, sample G outputs, score them, and let each output's
tokens share the group-relative advantage

    Â_i = (r_i − mean(r)) / std(r)                                           (advantage)

then minimise, per token t of output i, with ρ = π_θ / π_old,

    −min(ρ·Â_i, clip(ρ, 1−ε, 1+ε_high)·Â_i) + β·D_KL[π_θ ‖ π_ref]           (clipped surrogate)
    D_KL ≈ π_ref/π_θ − log(π_ref/π_θ) − 1                                  (k3 estimator, ≥ 0)

The variants users know by TRL's names differ only in two places:
  scale_rewards: divide by the group std ("group", GRPO), the batch std ("batch"), or not at
                 all ("none", Dr. GRPO: the std division biases towards easy/hard prompts);
  loss_type:     how token losses become one number — "grpo" averages each sequence then the
                 sequences (long outputs' tokens weigh less), "dr_grpo" divides the token sum
                 by a constant (num_sequences × max_completion_length), "dapo" by the number
                 of tokens (every token weighs the same).
epsilon_high > epsilon is DAPO's clip-higher: room for unlikely-but-good tokens to grow.
"""
from __future__ import annotations

import torch

STD_EPS = 1e-4  # as TRL: keeps groups with (nearly) equal rewards finite


def group_advantages(rewards: torch.Tensor, G: int, scale_rewards: str | bool = "group") -> torch.Tensor:
    """(N*G,) rewards, grouped consecutively by prompt → (N*G,) advantages.

    A = r − mean_group(r), divided by (std + 1e-4) of the group ("group"), of the whole batch
    ("batch"), or left as is ("none"). Std is the unbiased (n−1) one, as torch.std and TRL.
    """
    if scale_rewards is True:
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    if G < 1 or rewards.numel() % G:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of G={G}")
    r = rewards.detach().float().view(-1, G)
    # equal rewards ⇒ exactly zero advantage (a float mean of equal values can be off by an ulp,
    # which the 1e-4 below would blow up to ~1e-3); the update then skips such sequences
    A = torch.where((r == r[:, :1]).all(1, keepdim=True), 0.0, r - r.mean(dim=1, keepdim=True))
    if scale_rewards == "none":
        return A.flatten()
    if scale_rewards == "group":
        std = r.std(dim=1, keepdim=True) if G > 1 else torch.zeros_like(A)
    else:
        std = r.std() if r.numel() > 1 else torch.zeros(())
    return (A / (std + STD_EPS)).flatten()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL[π_θ ‖ π_ref]: e^(ref−logp) − (ref−logp) − 1 (Schulman)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-surrogate GRPO loss over (B, T) per-token log-probs of the sampled tokens.

    old_logp None means a single update per generation (num_iterations=1): π_old = π_θ
    detached, so ρ = 1 with the right gradient. ref_logp is needed only when beta != 0.
    mask is 1 on completion tokens that count (0 on padding, and on truncated completions when
    those are masked). Returns (loss, stats) with TRL's metric names.
    """
    if loss_type not in ("grpo", "dr_grpo", "dapo"):
        raise ValueError(f"loss_type must be 'grpo', 'dr_grpo' or 'dapo', got {loss_type!r}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp (the reference model's log-probs)")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    logp = logp.float()
    old = logp.detach() if old_logp is None else old_logp.float()
    m = mask.to(logp.dtype)
    A = advantages.float().view(-1, 1)

    ratio = torch.exp(logp - old)                                    # ρ = π_θ / π_old
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * A, clipped * A)                   # clipped surrogate
    kl = k3_kl(logp, ref_logp.float()) if ref_logp is not None else None
    if beta != 0.0:
        per_token = per_token + beta * kl

    n_tok = m.sum().clamp(min=1)
    if loss_type == "grpo":    # mean over each sequence's tokens, then over sequences
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":  # constant normaliser: no length bias
        L = max_completion_length or logp.size(1)
        loss = (per_token * m).sum() / (logp.size(0) * L)
    else:                      # dapo: token-level mean over the whole batch
        loss = (per_token * m).sum() / n_tok

    with torch.no_grad():  # where the clip is active (and the gradient is zero)
        low = ((ratio < 1 - eps_low) & (A < 0)).float()
        high = ((ratio > 1 + eps_high) & (A > 0)).float()

        def mean(x: torch.Tensor) -> float:
            return float((x * m).sum() / n_tok)

        stats = {
            "clip_ratio/low_mean": mean(low),
            "clip_ratio/high_mean": mean(high),
            "clip_ratio/region_mean": mean(((low + high) > 0).float()),
            "ratio_mean": mean(ratio),
        }
        if kl is not None:
            stats["kl"] = mean(kl)
    return loss, stats


def filter_equal_reward_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """DAPO's dynamic sampling: (N*G,) bool, False for every sample of a group whose rewards
    are all equal — its advantages are all zero, so it only dilutes the batch."""
    r = rewards.detach().view(-1, G)
    keep = (r.max(dim=1).values - r.min(dim=1).values) > 0
    return keep.repeat_interleave(G)


def frac_reward_zero_std(rewards: torch.Tensor, G: int) -> float:
    """Fraction of groups with identical rewards (TRL's metric; near 1 ⇒ nothing to learn)."""
    return 1.0 - float(filter_equal_reward_groups(rewards, G).view(-1, G)[:, 0].float().mean())
