"""Extreme but valid sampling parameters must still give a token, never NaN (found by fuzzing the API)."""

import pytest
import torch

from nanoseek.engine.sampling import SamplerState, SamplingParams, sample


@pytest.mark.parametrize("kw, greedy", [
    (dict(temperature=1e-300), True),
    (dict(top_p=1e-300), True),
    (dict(repetition_penalty=1e-300), False),
    (dict(repetition_penalty=1e300, temperature=0.7), False),
])
def test_extreme_parameters_sample_a_real_token(kw, greedy):
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 5
    states = [SamplerState(SamplingParams(seed=1, **kw), list(range(50)), 50, "cpu") for _ in range(3)]
    tokens, _ = sample(logits, states)
    assert all(0 <= t < 50 for t in tokens)
    if greedy:  # a vanishing temperature or nucleus leaves only the best token
        assert tokens == logits.argmax(-1).tolist()
