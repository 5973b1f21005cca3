"""Speculative decoding with the MTP modules: the target's text exactly under greedy decoding, the
target's distribution exactly under sampling, the drafts the model's own MTP modules make."""

from __future__ import annotations

import pytest
import torch

from conftest import sharp_tiny
from nanoseek.config import preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.sampling import SamplerState, probs
from nanoseek.engine.speculative import accept_drafts
from nanoseek.model import DeepSeekV3

GREEDY = dict(temperature=0, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Total variation between the empirical distribution of `counts` and p."""
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def prompts_of(lengths, seed=1, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, vocab, (n,), generator=g).tolist() for n in lengths]


def fit_mtp(model, prompts, new_tokens: int, steps: int = 60, lr: float = 1e-2) -> None:
    """Train `model`'s MTP module(s) on its own greedy continuations of `prompts`, main model
    frozen (what mtp-refresh does), so that the drafts are often, not always, right."""
    seqs = [model.generate(torch.tensor([p]), new_tokens)[0].tolist() for p in prompts]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    tgt = torch.tensor([s[1:] + [-100] * (T - len(s) + 1) for s in seqs])
    with torch.no_grad():
        h = model.hidden_states(ids)
    opt = torch.optim.Adam(model.mtp.parameters(), lr)
    for _ in range(steps):
        loss = model.mtp_loss(h, ids, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def drafting():
    """The sharp tiny model, its MTP module fitted to what it writes after the test prompts."""
    m = sharp_tiny(vocab_size=300)
    fit_mtp(m, prompts_of([5, 21, 2, 40, 9, 33], seed=3) + prompts_of([3, 11], seed=4), 24)
    return m


# ---------------------------------------------------------------------- rejection sampling
def test_accept_drafts_gives_the_target_distribution():
    """Explicit target and draft chains over 6 tokens (the target's second and third tokens
    depend on the ones before): every emitted token follows the target exactly, whatever the
    draft proposed — including tokens the draft never proposes and drafts the target forbids."""
    torch.manual_seed(0)
    V, B = 6, 200_000
    P0 = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.1, 0.0], dtype=torch.float64)
    P1 = torch.rand(V, V, dtype=torch.float64) ** 2
    P1[:, 1] = 0  # a token the target never writes second
    P1 /= P1.sum(-1, keepdim=True)
    P2 = torch.rand(V, V, dtype=torch.float64).softmax(-1)
    Q0 = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.5], dtype=torch.float64)  # mass on what p forbids
    Q1 = torch.rand(V, V, dtype=torch.float64)
    Q1[:, 0] = 0  # a token the draft never proposes second
    Q1 /= Q1.sum(-1, keepdim=True)
    d1 = torch.multinomial(Q0, B, replacement=True)
    d2 = torch.multinomial(Q1[d1], 1)[:, 0]
    p = torch.stack((P0.expand(B, V), P1[d1], P2[d2]), 1)
    q = torch.stack((Q0.expand(B, V), Q1[d1]), 1)
    n, final = accept_drafts(p, q, torch.stack((d1, d2), 1), torch.full((B,), 2), torch.rand(B, 2, dtype=torch.float64),
                             torch.rand(B, 3, dtype=torch.float64))
    t1 = torch.where(n >= 1, d1, final)
    assert tv(torch.bincount(t1, minlength=V).double(), P0) < 0.006
    # the first draft is kept with probability Σ min(p, q)
    assert (n >= 1).double().mean().item() == pytest.approx(torch.minimum(P0, Q0).sum().item(), abs=0.005)
    two = n >= 1  # given the first token, the second follows the target's conditional
    t2 = torch.where(n >= 2, d2, final)
    for a in range(V - 1):
        rows = two & (t1 == a)
        assert tv(torch.bincount(t2[rows], minlength=V).double(), P1[a]) < 0.03, a
    assert not (t2[two] == 1).any()
    three = n == 2  # both kept: the bonus token follows the target after them
    for b in range(V):
        rows = three & (d2 == b)
        if rows.sum() > 2000:
            assert tv(torch.bincount(final[rows], minlength=V).double(), P2[b]) < 0.04, b
    # a row with fewer real drafts stops at them; one with none just samples p_0
    n0, f0 = accept_drafts(p[:1000], q[:1000], torch.stack((d1, d2), 1)[:1000], torch.zeros(1000, dtype=torch.long),
                           torch.zeros(1000, 2, dtype=torch.float64), torch.rand(1000, 3, dtype=torch.float64))
    assert (n0 == 0).all() and (P0[f0] > 0).all()


# ---------------------------------------------------------------------- the drafts
def _reference_drafts(m, seq, drafts, depth):
    """The draft distributions the model's own MTP modules give after `seq` (module j on the
    chain of eq. 21 with d_1 … d_{j−1} as its tokens; past the last module, that module again on
    its own output, one position further)."""
    out, ids = [], torch.tensor([seq + drafts])
    N = len(seq) - 1  # the last known token's index; draft j is module j's prediction at N − 1
    with torch.no_grad():
        hk = m.hidden_states(ids)
        for j in range(1, min(depth, len(drafts)) + 1):
            mod, inp = m.mtp[j - 1], hk[:, :-1]
            hk = mod(inp, ids[:, j:], m.embed_tokens, m.rotary)
            out.append(mod.shared_head_logits(hk, m.lm_head)[0, N - 1].softmax(-1))
        h_prev, last = inp[:, :N], hk[:, N - 1:N]
        for _ in range(depth + 1, len(drafts) + 1):
            h_prev = torch.cat((h_prev, last), 1)
            last = mod(h_prev, ids[:, depth:depth + h_prev.shape[1]], m.embed_tokens, m.rotary)[:, -1:]
            out.append(mod.shared_head_logits(last, m.lm_head)[0, -1].softmax(-1))
    return out


@pytest.mark.parametrize("depth, k, copies", [(1, 1, 1), (2, 2, 1), (1, 3, 1), (2, 2, 3)])
def test_drafts_are_the_mtp_modules_predictions(depth, k, copies):
    """Through chunked prefill and decode steps, the engine's draft distributions are the
    model's own MTP modules' on the whole sequence (positions, history and depth chain in the
    paged cache are the training forward's) — also for copies of one prompt in one step, whose
    prompt is computed once and copied (GRPO's G completions)."""
    torch.manual_seed(0)
    m = DeepSeekV3(preset("tiny", num_nextn_predict_layers=depth)).eval()
    eng = Engine(m, block_size=4, max_batch_tokens=8 if copies == 1 else 64, speculative_tokens=k,
                 enable_prefix_cache=False)
    p = prompts_of([19], seed=5)[0]
    rids = [eng.add_request(p, SamplingParams(temperature=1.0, seed=3 + i, max_tokens=16, ignore_eos=True))
            for i in range(copies)]
    checked = 0
    while eng.has_unfinished():
        eng.step()
        for rid in rids:
            r = eng._live.get(rid)
            if r is None or not r.drafts:
                continue
            ref = _reference_drafts(m, list(r.all_ids), list(r.drafts), depth)
            for j, q in enumerate(ref):
                assert torch.allclose(r.draft_probs[j].float(), q, atol=1e-5), (len(r.all_ids), j)
                checked += 1
    assert checked >= 8 * copies
    assert eng.stats["prefill_tokens"] == 19  # the copies' prompt was computed once


# ---------------------------------------------------------------------- the engine
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculation_writes_the_same_tokens(drafting, tok, k):
    """Mixed-length prompts in a small budget (chunked prefill beside verifying rows), a shared
    prefix (prefix-cache hits), a stop string, logprobs, penalties, max_tokens: token for token
    and logprob for logprob what the engine writes without speculation."""
    shared = prompts_of([13], seed=7)[0]
    prompts = prompts_of([5, 21, 2, 40, 9, 33], seed=3) + [shared + p for p in prompts_of([3, 11], seed=4)]
    plain = Engine(drafting, tok, block_size=4)
    free = plain.generate(prompts[:1], SamplingParams(max_tokens=24, **GREEDY))[0]
    stop = tok.decode(free.token_ids[6:8])
    params = [SamplingParams(max_tokens=n, logprobs=True, top_logprobs=2, **GREEDY) for n in (24, 7, 16, 9, 12, 24, 14, 20)]
    params[0] = SamplingParams(max_tokens=24, stop=[stop], **GREEDY)
    params[4] = SamplingParams(max_tokens=18, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3,
                               **GREEDY)
    ref = Engine(drafting, tok, block_size=4).generate(prompts, params)
    eng = Engine(drafting, tok, block_size=4, max_num_seqs=4, max_batch_tokens=16, speculative_tokens=k)
    outs = eng.generate(prompts, params)
    for o, r in zip(outs, ref):
        assert (o.token_ids, o.text, o.finish_reason) == (r.token_ids, r.text, r.finish_reason)
        if r.logprobs:
            assert [lp.token_id for lp in o.logprobs] == r.token_ids
            assert [lp.logprob for lp in o.logprobs] == pytest.approx([lp.logprob for lp in r.logprobs], abs=1e-4)
            assert [list(lp.top_logprobs) for lp in o.logprobs] == [list(lp.top_logprobs) for lp in r.logprobs]
    assert ref[0].finish_reason == "stop" and outs[7].cached_tokens == 12
    st = eng.stats
    assert 0 < st["spec_num_accepted_tokens"] < st["spec_num_draft_tokens"]  # both paths were taken
    assert st["spec_num_draft_tokens_per_pos"][0] == st["spec_num_drafts"]
    assert st["spec_mean_accepted_length"] == pytest.approx(1 + st["spec_num_accepted_tokens"] / st["spec_num_drafts"])
    assert not eng.has_unfinished() and eng.cache_usage == 0


def test_sampled_speculation_follows_the_target_distribution(drafting):
    """The first three sampled tokens of 1500 seeded requests (temperature, top-k, top-p and a
    presence penalty): the second and third come from verifying drafts, and the joint
    frequencies of (t1, t2) match the target's distribution, as closely as without speculation."""
    p = prompts_of([9], seed=3)[0]
    sp = dict(temperature=0.8, top_k=4, top_p=0.9, presence_penalty=0.7, max_tokens=3, ignore_eos=True)
    st0 = SamplerState(SamplingParams(**sp), p, 300, "cpu")
    with torch.no_grad():
        z0 = drafting(torch.tensor([p]))[0, -1]
        p1 = probs(st0.penalise(z0)[None], [st0])[0]
        first = p1.nonzero()[:, 0].tolist()
        joint = torch.zeros(300, 300, dtype=torch.float64)
        for a in first:
            z1 = drafting(torch.tensor([p + [a]]))[0, -1]
            joint[a] = p1[a] * probs(st0.penalise(z1, [a])[None], [st0])[0]
    n = 1500
    runs = {}
    for k in (0, 2):
        eng = Engine(drafting, block_size=4, max_num_seqs=64, speculative_tokens=k)
        outs = eng.generate([p] * n, [SamplingParams(seed=s, **sp) for s in range(n)])
        counts = torch.zeros(300, 300, dtype=torch.float64)
        for o in outs:
            counts[o.token_ids[0], o.token_ids[1]] += 1
        runs[k] = (tv(counts.flatten(), joint.flatten()), eng.stats)
    assert runs[2][1]["spec_num_accepted_tokens"] > 0.3 * runs[2][1]["spec_num_draft_tokens"]
    assert runs[2][0] < 0.08 and runs[0][0] < 0.08, runs


def test_grpo_rollouts_are_the_same_with_speculation(drafting, tok):
    """GRPO's rollout sampler (the live policy object, refreshed before each batch) writes the
    same greedy completions with speculation, twice in a row, G copies of each prompt."""
    from nanoseek.tasks import ArithmeticTask
    from nanoseek.train.grpo import EngineSampler, build_prompt

    prompts = [build_prompt(p, tok, "chat") for p in ArithmeticTask().make(4, 0, split="test") for _ in range(3)]
    got = {}
    for k in (0, 2):
        sampler = EngineSampler(drafting, tok, max_num_seqs=8, max_len=128, speculative_tokens=k)
        got[k] = [[r.ids for r in sampler.generate(prompts, 20, temperature=0.0)] for _ in range(2)]
        if k:
            assert sampler.engine.stats["spec_num_accepted_tokens"] > 0
    assert got[2] == got[0] and got[0][0] == got[0][1]


def test_serve_counts_drafts_under_vllm_names(tmp_path):
    """`nanoseek serve --speculative-tokens 2`: the scripted reply unchanged, and /metrics carries
    the engine's draft counters under vLLM's names."""
    import re

    import httpx

    from nanoseek.serve import ServeConfig, create_app
    from nanoseek.serve.api import build_engine
    from nanoseek.serve.testing import CONTENT, ServerThread, make_scripted_checkpoint

    cfg = ServeConfig(ckpt=str(make_scripted_checkpoint(tmp_path / "scripted")), speculative_tokens=2)
    engine = build_engine(cfg)
    with ServerThread(create_app(engine, cfg)) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "nanoseek", "temperature": 0, "messages": [{"role": "user", "content": "Hello"}]}).json()
        text = httpx.get(url + "/metrics").text
    assert r["choices"][0]["message"]["content"] == CONTENT
    st = engine.stats
    assert st["spec_num_drafts"] > 0
    for name, key in (("drafts", "spec_num_drafts"), ("draft_tokens", "spec_num_draft_tokens"),
                      ("accepted_tokens", "spec_num_accepted_tokens")):
        assert re.search(rf"^nanoseek_spec_decode_num_{name}_total {st[key]}$", text, re.M), name
    per_pos = re.findall(r'^nanoseek_spec_decode_num_accepted_tokens_per_pos_total\{position="(\d)"\} (\d+)$', text, re.M)
    assert [int(v) for _, v in per_pos] == st["spec_num_accepted_tokens_per_pos"] and len(per_pos) == 2


def test_seeded_speculation_is_the_same_alone_or_in_a_batch(drafting):
    """A seeded sampled request draws its drafts, their tests and its tokens from its own
    (seed, position) streams: the same text alone or beside others (and not a copy of another seed's)."""
    p = prompts_of([6], seed=11)[0]
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = Engine(drafting, speculative_tokens=2).generate([p], sp)[0].token_ids
    others = [SamplingParams(max_tokens=n, temperature=0.7, ignore_eos=True) for n in (5, 30, 9)]
    eng = Engine(drafting, max_batch_tokens=8, speculative_tokens=2)
    batch = eng.generate(prompts_of([3, 17, 30], seed=12) + [p], others + [sp])
    assert batch[3].token_ids == alone and eng.stats["spec_num_accepted_tokens"] > 0
    other = Engine(drafting, speculative_tokens=2).generate([p], SamplingParams(**{**sp.__dict__, "seed": 99}))[0]
    assert other.token_ids != alone
