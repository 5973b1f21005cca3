"""GRPO loss math against hand-worked numbers; plus the eval metrics (pass@k, maj@k)."""
import math

import pytest
import torch

from nanoseek.eval.metrics import maj_at_k, majority, pass_at_1, pass_at_k
from nanoseek.train.grpo_loss import (filter_equal_reward_groups, frac_reward_zero_std,
                                      group_advantages, grpo_loss, k3_kl)

# Two prompts × G=3.  Group 1 rewards [0,3,6]: mean 3, deviations [-3,0,3],
# unbiased var (9+0+9)/2 = 9, std 3.  Group 2 [2,4,0]: mean 2, deviations [0,2,-2],
# var (0+4+4)/2 = 4, std 2.
R = torch.tensor([0.0, 3.0, 6.0, 2.0, 4.0, 0.0])
DEV = torch.tensor([-3.0, 0.0, 3.0, 0.0, 2.0, -2.0])


def test_advantages_none_is_dr_grpo():
    assert torch.equal(group_advantages(R, 3, "none"), DEV)
    assert torch.equal(group_advantages(R, 3, False), DEV)


def test_advantages_group_std():
    # A = dev / (std + 1e-4): group 1 / 3.0001, group 2 / 2.0001 → ≈ [-1,0,1, 0,1,-1]
    want = torch.tensor([-3 / 3.0001, 0, 3 / 3.0001, 0, 2 / 2.0001, -2 / 2.0001])
    assert torch.allclose(group_advantages(R, 3, "group"), want, atol=1e-6)


def test_advantages_batch_std():
    # batch mean 15/6 = 2.5; squared deviations 6.25+.25+12.25+.25+2.25+6.25 = 27.5;
    # unbiased var 27.5/5 = 5.5 → std √5.5 ≈ 2.34521; baseline is still each group's mean
    want = DEV / (math.sqrt(5.5) + 1e-4)
    assert torch.allclose(group_advantages(R, 3, "batch"), want, atol=1e-6)


def test_equal_rewards_give_zero_advantage_and_are_filtered():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    assert torch.equal(group_advantages(r, 3)[:3], torch.zeros(3))
    assert filter_equal_reward_groups(r, 3).tolist() == [False] * 3 + [True] * 3
    assert frac_reward_zero_std(r, 3) == 0.5
    with pytest.raises(ValueError, match="groups of G=4"):
        group_advantages(r, 4)


# Aggregation. ρ = 1 (old = logp), β = 0, so every counted token's loss is −A.
# Sequence 1: A = 1, 3 tokens → token losses -1,-1,-1.  Sequence 2: A = -2, 1 token → +2.
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
ADV = torch.tensor([1.0, -2.0])


@pytest.mark.parametrize("loss_type,L,want", [
    ("grpo", None, 0.5),         # sequence means -1 and 2 → (−1+2)/2
    ("dapo", None, -0.25),       # token sum (−3+2) / 4 tokens
    ("dr_grpo", 4, -0.125),      # token sum −1 / (2 sequences × max_completion_length 4)
    ("dr_grpo", None, -1 / 6),   # ... with L defaulting to the padded width 3
])
def test_loss_types(loss_type, L, want):
    logp = LOGP.clone().requires_grad_()
    loss, stats = grpo_loss(logp, LOGP, None, ADV, MASK, loss_type=loss_type, max_completion_length=L)
    assert loss.item() == pytest.approx(want)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["clip_ratio/region_mean"] == 0.0
    loss.backward()
    assert torch.all(logp.grad[MASK == 0] == 0)  # padding gets no gradient


def test_grpo_gradient_by_hand():
    # d/dlogp of −ρA (ρ=1) is −A, scaled by 1/(len_i · B): seq 1: −1/(3·2) = −1/6; seq 2: 2/(1·2) = 1
    logp = LOGP.clone().requires_grad_()
    grpo_loss(logp, None, None, ADV, MASK)[0].backward()
    want = torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [1.0, 0.0, 0.0]])
    assert torch.allclose(logp.grad, want)


def test_k3_kl_by_hand():
    # π = 0.5, π_ref = 0.25: ref−logp = log 0.5; k3 = 0.5 − log 0.5 − 1 = log 2 − 0.5 ≈ 0.193147
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert k3_kl(logp, ref).item() == pytest.approx(math.log(2) - 0.5)
    assert k3_kl(ref, ref).item() == 0.0
    # with β = 0.1 and A = 0 the loss is β·k3
    loss, stats = grpo_loss(logp, None, ref, torch.zeros(1), torch.ones(1, 1), beta=0.1)
    assert loss.item() == pytest.approx(0.1 * (math.log(2) - 0.5))
    assert stats["kl"] == pytest.approx(math.log(2) - 0.5)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, None, None, torch.zeros(1), torch.ones(1, 1), beta=0.1)


def test_clip_higher_is_asymmetric_and_stops_gradient():
    # one token per sequence, old_logp = 0 so ρ = e^logp.  ε = 0.2, ε_high = 0.28.
    ratios = torch.tensor([1.25, 1.3, 0.7, 1.3])
    A = torch.tensor([1.0, 1.0, -1.0, -1.0])
    logp = ratios.log().view(4, 1).requires_grad_()
    loss, stats = grpo_loss(logp, torch.zeros(4, 1), None, A, torch.ones(4, 1),
                            loss_type="dapo", epsilon=0.2, epsilon_high=0.28)
    # per-token −min(ρA, clip(ρ, 0.8, 1.28)A):
    #   1.25, A=+1: clip keeps 1.25 → −1.25 (inside 1.28: NOT clipped, gradient −ρA = −1.25)
    #   1.3,  A=+1: min(1.3, 1.28) → −1.28 (clipped high: zero gradient)
    #   0.7,  A=−1: min(−0.7, −0.8) → +0.8 (clipped low: zero gradient)
    #   1.3,  A=−1: min(−1.3, −1.28) → +1.3 (pessimistic side, not clipped, gradient −ρA = 1.3)
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8 + 1.3) / 4)
    loss.backward()
    assert torch.allclose(logp.grad.flatten(), torch.tensor([-1.25, 0.0, 0.0, 1.3]) / 4)
    assert stats["clip_ratio/high_mean"] == 0.25 and stats["clip_ratio/low_mean"] == 0.25
    assert stats["clip_ratio/region_mean"] == 0.5
    # symmetric ε = 0.2 would clip ratio 1.25 as well
    _, sym = grpo_loss(logp.detach()[:1], torch.zeros(1, 1), None, A[:1], torch.ones(1, 1))
    assert sym["clip_ratio/high_mean"] == 1.0


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(LOGP, None, None, ADV, MASK, loss_type="ppo")
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(R, 3, "std")


# ---- eval metrics -------------------------------------------------------------------------

def test_pass_at_1():
    # problem 1: 1 of 2 right (0.5); problem 2: 3 of 3 (1.0) → 0.75
    assert pass_at_1([[True, False], [True, True, True]]) == 0.75


def test_pass_at_k_unbiased_by_hand():
    # n=5, c=2, k=2: 1 − C(3,2)/C(5,2) = 1 − 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)   # k=1 is c/n
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0                    # n−c=2 < k: every draw hits
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_maj_at_k():
    assert majority(["3", None, "4", "3"]) == "3"
    assert majority(["4", "3"]) == "4"                  # tie → first seen
    assert majority([None, None]) is None
    # problem 1 votes 82 (right), problem 2 votes 7 (truth 8), problem 3 nothing parsed
    assert maj_at_k([["82", "82", "81"], ["7", "8", "7"], [None]], ["82", "8", "1"]) == pytest.approx(1 / 3)
