"""The engine must decode exactly what the model means, however requests are batched or cached."""

from __future__ import annotations

import asyncio
import warnings

import pytest
import torch

from nanoseek.checkpoint import save_pretrained
from conftest import sharp_tiny
from nanoseek.engine import AsyncEngine, Engine, PromptTooLongError, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return sharp_tiny()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny):
    return save_pretrained(tiny, tmp_path_factory.mktemp("tiny") / "ckpt")


def prompts_of(lengths, seed=1, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(8, 512, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------- exactness
def test_greedy_equals_transformers_batched_continuous_prefix_cached(ckpt):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    shared = prompts_of([13], seed=7)[0]
    prompts = prompts_of([5, 21, 2, 40], seed=3) + prompts_of([3, 11], seed=4, prefix=shared)
    n_new = [12, 7, 16, 9, 12, 14]
    # small budget and blocks: long prompts are prefilled in chunks beside running decodes,
    # requests join/leave mid-flight, and the two shared-prefix prompts hit the prefix cache
    eng = Engine(str(ckpt), device="cpu", max_num_seqs=4, max_batch_tokens=16, block_size=4)
    outs = eng.generate(prompts, [SamplingParams(max_tokens=n, **GREEDY) for n in n_new])
    for p, n, o in zip(prompts, n_new, outs):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)[0, len(p):]
        assert o.token_ids == ref.tolist(), (len(p), o.token_ids, ref.tolist())
        assert o.finish_reason == "length"
    assert outs[5].cached_tokens == 12  # the 13-token shared prefix → 3 full 4-token blocks
    assert eng.num_running == eng.num_waiting == 0 and eng.cache_usage == 0.0


def test_cache_stores_only_latents(tiny):
    eng = Engine(tiny, cache_tokens=64, block_size=16)
    c = tiny.config
    assert eng.bytes_per_token == (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 4 == 480
    assert eng.cache.nbytes == eng.bytes_per_token * (eng.num_blocks + 1) * 16  # + the scratch block
    half = Engine(tiny, cache_tokens=64, dtype=torch.bfloat16)
    assert half.bytes_per_token == 240
    tiny.float()


def test_prefix_cache_hits_prefill_only_the_rest(tiny):
    prefix = prompts_of([40], seed=9)[0]
    a, b = prefix + [11, 12, 13], prefix + [21, 22]
    sp = SamplingParams(max_tokens=8, **GREEDY)
    cold = Engine(tiny, block_size=8, enable_prefix_cache=False)
    ref = [o.token_ids for o in cold.generate([a, b], sp)]
    eng = Engine(tiny, block_size=8)
    first = eng.generate([a], sp)[0]
    assert first.cached_tokens == 0 and eng.stats["prefill_tokens"] == 43
    second = eng.generate([b], sp)[0]
    assert second.cached_tokens == 40  # five full 8-token blocks of the shared prefix
    assert eng.stats["prefill_tokens"] == 43 + 2  # only the two new prompt tokens were computed
    assert [first.token_ids, second.token_ids] == ref
    # the whole prompt cached: the last token is still computed (its logits are needed)
    again = eng.generate([prefix], sp)[0]
    assert again.cached_tokens == 32 and again.token_ids == cold.generate([prefix], sp)[0].token_ids


def test_prefix_blocks_evicted_lru_when_cache_is_full(tiny):
    eng = Engine(tiny, block_size=4, num_blocks=9)  # 8 usable blocks = 32 tokens
    sp = SamplingParams(max_tokens=1, **GREEDY)
    p1, p2 = prompts_of([12, 12], seed=5)
    eng.generate([p1], sp)
    assert eng.generate([p1], sp)[0].cached_tokens == 8
    eng.generate(prompts_of([28], seed=6), sp)  # needs 7 blocks: p1's cached blocks get evicted
    assert eng.generate([p1], sp)[0].cached_tokens == 0
    assert eng.num_free_blocks == 8


# ---------------------------------------------------------------------- sampling
def test_seeded_sampling_same_alone_or_in_a_batch(tiny):
    p = prompts_of([6], seed=11)[0]
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = Engine(tiny).generate([p], sp)[0].token_ids
    others = [SamplingParams(max_tokens=n, temperature=0.7, seed=None, ignore_eos=True) for n in (5, 30, 9)]
    batch = Engine(tiny, max_batch_tokens=8).generate(prompts_of([3, 17, 30], seed=12) + [p], others + [sp])
    assert batch[3].token_ids == alone
    other_seed = Engine(tiny).generate([p], SamplingParams(**{**sp.__dict__, "seed": 99}))[0].token_ids
    assert other_seed != alone


def test_identical_prompts_in_one_step_are_prefilled_once(tiny):
    """GRPO's G copies of a prompt: computed once, copied, then sampled apart — each copy's text
    is what its seed gives alone (greedy too), in one step or chunk by chunk."""
    p = prompts_of([21], seed=13)[0]
    sps = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    sps.append(SamplingParams(max_tokens=12, **GREEDY))
    alone = [Engine(tiny).generate([p], sp)[0].token_ids for sp in sps]
    assert len({tuple(a) for a in alone}) == 4
    eng = Engine(tiny, block_size=4)
    assert [o.token_ids for o in eng.generate([p] * 4, sps)] == alone
    assert eng.stats["prefill_tokens"] == 21  # one copy's prompt, over six 4-token blocks
    chunked = Engine(tiny, block_size=4, max_batch_tokens=16, enable_prefix_cache=False)
    assert [o.token_ids for o in chunked.generate([p] * 4, sps)] == alone


def test_sampling_limits_and_penalties(tiny):
    p = prompts_of([6], seed=11)[0]
    eng = Engine(tiny)
    greedy = eng.generate([p], SamplingParams(max_tokens=10, **GREEDY))[0].token_ids
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        assert eng.generate([p], SamplingParams(max_tokens=10, temperature=1.5, seed=0, ignore_eos=True, **kw))[0].token_ids == greedy
    # a huge presence penalty forbids repeating any generated token
    out = eng.generate([p], SamplingParams(max_tokens=30, temperature=0, presence_penalty=1e4, ignore_eos=True))[0]
    assert len(set(out.token_ids)) == 30


def test_penalty_math():
    from nanoseek.engine.sampling import SamplerState, filter_top_k_top_p

    st = SamplerState(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
                      prompt_ids=[0], vocab=4, device="cpu")
    st.observe(1)
    st.observe(1)
    got = st.penalise(torch.tensor([4.0, -4.0, 1.0, 1.0]))
    # id 0: seen in prompt → 4/2; id 1: seen, counted twice → -4·2 − 0.5·2 − 0.25
    assert got.tolist() == [2.0, -9.25, 1.0, 1.0]
    rows = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.1, 0.4, 0.2, 0.3]]))
    kept = filter_top_k_top_p(rows, torch.tensor([0, 3, 2]), torch.tensor([0.8, 0.6, 1.0]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False],  # top-p 0.8: 0.5 + 0.3
                                             [False, False, True, True],  # top-3, then 0.6 of 0.95
                                             [False, True, False, True]]  # top-2


def test_logprobs_are_the_models(tiny):
    p = prompts_of([5], seed=2)[0]
    out = Engine(tiny).generate([p], SamplingParams(max_tokens=3, logprobs=True, top_logprobs=3, **GREEDY))[0]
    ids = torch.tensor([p + out.token_ids[:-1]])
    ref = tiny(ids)[0, len(p) - 1:].log_softmax(-1)
    for lp, row, tok in zip(out.logprobs, ref, out.token_ids):
        assert lp.token_id == tok and lp.logprob == pytest.approx(row[tok].item(), abs=1e-4)
        top = row.topk(3)
        assert list(lp.top_logprobs) == top.indices.tolist()
        assert list(lp.top_logprobs.values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_stop_token_ids(tiny):
    p = prompts_of([6], seed=11)[0]
    eng = Engine(tiny)
    free = eng.generate([p], SamplingParams(max_tokens=10, **GREEDY))[0].token_ids
    out = eng.generate([p], SamplingParams(max_tokens=10, stop_token_ids=[free[4]], **GREEDY))[0]
    assert out.token_ids == free[: free.index(free[4]) + 1] and out.finish_reason == "stop"


# ---------------------------------------------------------------------- limits
def test_prompt_too_long_is_a_clear_error(tiny):
    eng = Engine(tiny)
    with pytest.raises(PromptTooLongError, match=r"300 tokens.*context is 256"):
        eng.add_request(list(range(8, 308)), SamplingParams())
    assert eng.num_waiting == 0
    # generation stops at the context limit, not beyond it
    out = eng.generate([list(range(8, 8 + 250))], SamplingParams(max_tokens=50, **GREEDY))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    small = Engine(tiny, num_blocks=5, block_size=4)  # 16 tokens of cache
    with pytest.raises(PromptTooLongError, match="KV cache holds 16 tokens"):
        small.add_request(list(range(8, 28)), SamplingParams())


def test_tiny_cache_requests_wait_or_are_preempted_never_corrupted(tiny):
    prompts = prompts_of([10, 7, 12, 4, 9], seed=21)
    sps = [SamplingParams(max_tokens=n, **GREEDY) for n in (14, 10, 6, 18, 12)]
    ref = [o.token_ids for o in Engine(tiny).generate(prompts, sps)]
    eng = Engine(tiny, num_blocks=9, block_size=4, max_batch_tokens=8)  # 32 tokens for ~130 needed
    outs = eng.generate(prompts, sps)
    assert [o.token_ids for o in outs] == ref
    assert eng.stats["preemptions"] > 0 and eng.num_free_blocks == 8
    # a request that alone outgrows the whole cache ends with "length" and frees it
    out = eng.generate([prompts[0]], SamplingParams(max_tokens=100, **GREEDY))[0]
    assert out.finish_reason == "length" and len(prompts[0]) + len(out.token_ids) == 33


def test_abort_frees_blocks(tiny):
    eng = Engine(tiny, block_size=4)
    rid = eng.add_request(prompts_of([20])[0], SamplingParams(max_tokens=50, **GREEDY))
    eng.step()
    eng.step()
    assert eng.num_running == 1 and eng.cache_usage > 0
    eng.abort(rid)
    assert eng.cache_usage == 0 and eng.num_running == 0
    ev = eng.step()
    assert [(e.request_id, e.finish_reason, e.finished) for e in ev] == [(rid, "abort", True)]
    assert not eng.has_unfinished()


def test_async_engine_streams_and_cancel_aborts(tiny):
    eng = Engine(tiny, block_size=4)
    aeng = AsyncEngine(eng)
    p = prompts_of([9], seed=4)[0]
    ref = Engine(tiny).generate([p], SamplingParams(max_tokens=6, **GREEDY))[0].token_ids

    async def main():
        got = []
        async for ev in aeng.generate_stream(p, SamplingParams(max_tokens=6, **GREEDY)):
            got += ev.token_ids
        it = aeng.generate_stream(p, SamplingParams(max_tokens=200, **GREEDY)).__aiter__()
        await it.__anext__()
        await it.aclose()  # client disconnect
        return got

    try:
        assert asyncio.run(main()) == ref
        with pytest.raises(PromptTooLongError):
            asyncio.run(aeng.generate_stream(list(range(8, 400)), SamplingParams()).__anext__())
    finally:
        aeng.shutdown()
    assert eng.num_running == eng.num_waiting == 0 and eng.cache_usage == 0


@pytest.mark.parametrize("overrides", [
    dict(q_lora_rank=None, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    dict(first_k_dense_replace=0, n_shared_experts=0, n_group=1, topk_group=1),
])
def test_paged_mla_path_matches_the_model(overrides):
    """PagedMLA's folded weights (no q low-rank + YaRN; all-MoE without shared experts)
    give the model's own greedy tokens."""
    m = sharp_tiny(3, **overrides)
    prompts = prompts_of([4, 19, 9], seed=8)
    outs = Engine(m, block_size=4, max_batch_tokens=12).generate(prompts, SamplingParams(max_tokens=10, **GREEDY))
    for p, o in zip(prompts, outs):
        assert o.token_ids == m.generate(torch.tensor([p]), 10)[0, len(p):].tolist()


def test_long_prompt_attends_in_query_blocks(tiny, monkeypatch):
    """A prefill whose score tensor is over the limit attends in blocks of queries, each against
    the keys up to its own last row: the model's own greedy tokens, beside a decoding request."""
    from nanoseek.engine.paged_mla import AttnGroup

    monkeypatch.setattr(AttnGroup, "max_scores", 4 * 4 * 64)  # B·H·S·t: a few query rows per block
    prompts = prompts_of([150, 9], seed=17)
    outs = Engine(tiny, block_size=8).generate(prompts, SamplingParams(max_tokens=8, **GREEDY))
    for p, o in zip(prompts, outs):
        assert o.token_ids == tiny.generate(torch.tensor([p]), 8)[0, len(p):].tolist()
