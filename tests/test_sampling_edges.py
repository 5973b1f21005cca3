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


def test_draws_follow_the_distribution_and_depend_only_on_seed_and_step():
    from nanoseek.engine.sampling import draw

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40000

    def states(seeds, steps, **kw):
        out = []
        for seed, step in zip(seeds, steps):
            st = SamplerState(SamplingParams(seed=seed, **kw), [], 6, "cpu")
            st.step = step
            out.append(st)
        return out

    p = logits.softmax(-1)
    # one request's stream over its steps, and many requests' first draws: both are softmax(logits)
    for seeds, steps in (([5] * n, range(n)), (range(n), [0] * n)):
        freq = torch.bincount(draw(logits.expand(n, 6), states(seeds, steps)), minlength=6) / n
        assert (freq - p).abs().max() < 0.012, (freq, p)
    # temperature 0.5 sharpens to softmax(2·logits); top-k 2 keeps the two best, renormalised
    freq = torch.bincount(draw(logits.expand(n, 6), states(range(n), [0] * n, temperature=0.5)), minlength=6) / n
    assert (freq - (2 * logits).softmax(-1)).abs().max() < 0.012
    freq = torch.bincount(draw(logits.expand(n, 6), states(range(n), [0] * n, top_k=2)), minlength=6) / n
    assert freq[2:].sum() == 0 and abs(freq[0] - p[0] / p[:2].sum()) < 0.012
    # a row's token is a function of its (seed, step) only, not of its neighbours in the batch
    rows = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    alone = [draw(rows[i:i + 1], states([i], [7]))[0].item() for i in range(8)]
    assert draw(rows, states(range(8), [7] * 8)).tolist() == alone


def test_any_api_seed_samples():
    """The API accepts seeds in [−2⁶³, 2⁶³); the random stream reads their low 32 bits."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))

    def stream(seed):
        st = SamplerState(SamplingParams(seed=seed), [], 50, "cpu")
        out = []
        for _ in range(20):
            out += sample(logits, [st])[0]
            st.observe(out[-1])
        return out

    assert stream(-5) == stream(2**32 - 5) != stream(2**63 - 1)
    assert stream(-(2**63)) == stream(0)
