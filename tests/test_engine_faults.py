"""The engine under bad luck: seeds whose hash could be degenerate, and one request that fails.

The model is the scripted checkpoint (nanoseek.serve.testing): after ``<|assistant|>`` its next
token is known to be ``<think>`` (a margin of ``scale`` logits), so a hot temperature turns it into
a coin whose odds are read off the model itself.
"""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine import engine as engine_module
from nanoseek.engine.engine import RequestFailedError
from nanoseek.engine.sampling import uniforms
from nanoseek.serve.testing import CONTENT, make_scripted_checkpoint


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    torch.set_num_threads(1)
    return Engine(str(make_scripted_checkpoint(tmp_path_factory.mktemp("faults") / "scripted")), device="cpu")


def _prompt(eng, text="Hello there"):
    return eng.tokenizer.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)[0]


def test_every_seed_draws_a_proper_uniform():
    """lowbias32(0) = 0 once made seed 0's first uniform ~7e-9: the lowest token id with any mass."""
    special = [0, 1, -1, 2**31, 2**32, 2**32 - 1, 2**63 - 1, -(2**63)]
    u = uniforms(special, [0] * len(special))
    assert ((u > 0.05) & (u < 0.95)).all(), u
    sweep = uniforms(list(range(20000)), [0] * 20000).sort().values
    ecdf_gap = (sweep - torch.arange(1, 20001, dtype=torch.float64) / 20000).abs().max()
    assert ecdf_gap < 0.015  # Kolmogorov-Smirnov: 20,000 first draws are uniform


def test_seed_zero_and_a_sweep_of_seeds_give_real_first_tokens(eng):
    prompt = _prompt(eng)
    temperature = 2.0
    with torch.inference_mode():
        p = (eng.model(torch.tensor([prompt]))[0, -1] / temperature).softmax(-1)
    think = eng.tokenizer.think_id
    assert p.argmax().item() == think and 0.2 < p[think] < 0.8  # a known first token, drawn as a coin
    seeds = list(range(300)) + [-1, 2**63 - 1, -(2**63)]
    outs = eng.generate([prompt] * len(seeds), [SamplingParams(seed=s, temperature=temperature, max_tokens=1)
                                                for s in seeds])
    first = [o.token_ids[0] for o in outs]
    assert first[0] == think  # seed 0 (its uniform is 0.38): the likely token, not <|bos|> or <|eos|>
    freq = sum(t == think for t in first[:300]) / 300
    assert abs(freq - p[think].item()) < 0.1, (freq, p[think].item())
    low = sum(t in (0, 1) for t in first)  # <|bos|>, <|eos|>: what a degenerate uniform picks
    assert low <= max(3, 3 * len(first) * p[:2].sum().item())
    assert len(set(first)) > 10


def _poison_sample(monkeypatch, seed=666):
    real = engine_module.sample

    def sample(logits, states):
        if any(s.seed == seed for s in states):
            raise RuntimeError("poisoned sampler")
        return real(logits, states)

    monkeypatch.setattr(engine_module, "sample", sample)


def _poison_forward(monkeypatch, eng, token):
    real = eng.paged.hidden

    def hidden(ids, *a, **kw):
        if (ids == token).any():
            raise RuntimeError("poisoned forward")
        return real(ids, *a, **kw)

    monkeypatch.setattr(eng.paged, "hidden", hidden)


@pytest.mark.parametrize("where", ["sample", "forward"])
def test_a_failing_request_fails_alone(eng, monkeypatch, where):
    good = _prompt(eng)
    alone = eng.generate([good], SamplingParams(temperature=0, max_tokens=20))[0]
    assert alone.text.endswith(CONTENT)
    poison = eng.tokenizer.vocab_size - 1
    assert poison not in good + alone.token_ids
    if where == "sample":
        _poison_sample(monkeypatch)
        bad, bad_params = good, SamplingParams(seed=666, temperature=1.0, max_tokens=8)
    else:
        _poison_forward(monkeypatch, eng, poison)
        bad, bad_params = good[:-1] + [poison, good[-1]], SamplingParams(temperature=0, max_tokens=8)
    outs = eng.generate([good, bad, good], [SamplingParams(temperature=0, max_tokens=20), bad_params,
                                             SamplingParams(temperature=0, max_tokens=20)])
    assert [o.finish_reason for o in outs] == [alone.finish_reason, "error", alone.finish_reason]
    assert f"RuntimeError: poisoned {where}" in outs[1].error and outs[1].token_ids == []
    assert outs[0].token_ids == outs[2].token_ids == alone.token_ids  # the neighbours did not notice
    # the engine is healthy: nothing left running, every block back, the next batch is served
    assert not eng.has_unfinished() and eng.cache_usage == 0
    assert eng.generate([good], SamplingParams(temperature=0, max_tokens=20))[0].token_ids == alone.token_ids
    with pytest.raises(RequestFailedError, match=r"request req-\d+ failed in the engine: RuntimeError: poisoned"):
        list(eng.stream(bad, bad_params))
    assert not eng.has_unfinished()


def test_async_engine_fails_one_stream_and_serves_the_other(eng, monkeypatch):
    import asyncio

    from nanoseek.engine import AsyncEngine

    _poison_sample(monkeypatch)
    prompt = _prompt(eng)
    aeng = AsyncEngine(eng)

    async def collect(params, rid):
        out = []
        async for ev in aeng.generate_stream(prompt, params, request_id=rid):
            out += ev.token_ids
        return out

    async def main():
        return await asyncio.gather(collect(SamplingParams(temperature=0, max_tokens=20), "ok"),
                                    collect(SamplingParams(seed=666, temperature=1.0, max_tokens=8), "bad"),
                                    return_exceptions=True)

    try:
        ok, bad = asyncio.run(main())
    finally:
        aeng.shutdown()
    assert isinstance(bad, RequestFailedError) and bad.request_id == "bad" and "poisoned" in str(bad)
    assert eng.tokenizer.decode(ok).endswith(CONTENT + "<|eos|>")
