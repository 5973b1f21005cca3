"""`nanoseek serve`'s request shapes from DeepSeek, vLLM and OpenAI beyond the basic session:
``thinking`` as an object, ``/tokenize`` and ``/detokenize``, list prompts, ``n`` > 1.

Same scripted checkpoint as tests/test_serve.py: greedy decoding writes
``<think>\\nLet me think</think>The answer is yes.<|eos|>`` after ``<|assistant|>``, so every
count below is exact.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import openai
import pytest

from nanoseek.serve import ServeConfig, create_app
from nanoseek.serve.testing import CONTENT, REASONING, ServerThread, make_scripted_checkpoint

engine_mod = pytest.importorskip("nanoseek.engine")
KEY = "sk-shapes-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAIN_LEN = 12  # <think> \n Let me think </think> The answer is yes . <|eos|>


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    ckpt = make_scripted_checkpoint(tmp_path_factory.mktemp("shapes") / "scripted")
    engine = engine_mod.Engine(str(ckpt), device="cpu", block_size=16, max_num_seqs=8)
    app = create_app(engine, ServeConfig(ckpt=str(ckpt), api_key=[KEY], max_num_seqs=8))
    with ServerThread(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, engine=engine, tok=engine.tokenizer, http=http, client=client)


def _chat(srv, **kw):
    body = {"model": "nanoseek", "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, **kw}
    return srv.http.post("/v1/chat/completions", json=body)


# ------------------------------------------------------------------------------ thinking
@pytest.mark.parametrize("model, thinking, pre_opened", [
    ("nanoseek", {"type": "enabled"}, True), ("nanoseek", True, True),
    ("deepseek-reasoner", {"type": "disabled"}, False), ("deepseek-reasoner", False, False),
    ("deepseek-reasoner", None, True)])
def test_thinking_object_and_boolean_mean_the_same(srv, model, thinking, pre_opened):
    r = _chat(srv, model=model, thinking=thinking)
    assert r.status_code == 200, r.text
    body = r.json()
    msg = body["choices"][0]["message"]
    assert msg["reasoning_content"] == REASONING and msg["content"] == CONTENT
    prompt = srv.tok.render_chat([{"role": "user", "content": "Hello there"}], True, think=pre_opened)[0]
    assert body["usage"]["prompt_tokens"] == len(prompt)
    # a pre-opened "<think>\n" is prompt, not completion
    assert body["usage"]["completion_tokens"] == CHAIN_LEN - (2 if pre_opened else 0)


@pytest.mark.parametrize("bad", [{"type": "on"}, {}, "maybe", 1, ["enabled"]])
def test_bad_thinking_is_422_naming_the_field(srv, bad):
    r = _chat(srv, thinking=bad)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == "thinking" and '"enabled"' in err["message"]


# ------------------------------------------------------------------------------ /tokenize, /detokenize
def test_tokenize_prompt_counts_what_completions_prefills(srv):
    r = srv.http.post("/tokenize", json={"model": "nanoseek", "prompt": "Let me think"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == srv.tok.encode("Let me think", True, False)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == srv.engine.max_context
    done = srv.client.completions.create(model="nanoseek", prompt="Let me think", max_tokens=1, temperature=0)
    assert done.usage.prompt_tokens == body["count"]
    plain = srv.http.post("/tokenize", json={"prompt": "Let me think", "add_special_tokens": False}).json()
    assert plain["tokens"] == body["tokens"][1:]  # without <|bos|>


def test_tokenize_messages_counts_what_chat_prefills(srv):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    body = srv.http.post("/tokenize", json={"messages": msgs, "model": "deepseek-reasoner"}).json()
    assert body["tokens"] == srv.tok.render_chat(msgs, True, think=True)[0]
    chat = srv.client.chat.completions.create(model="deepseek-reasoner", messages=msgs, temperature=0, max_tokens=1)
    assert chat.usage.prompt_tokens == body["count"]
    off = srv.http.post("/tokenize", json={"messages": msgs, "thinking": {"type": "disabled"}}).json()
    assert off["tokens"] == srv.tok.render_chat(msgs, True, think=False)[0]
    bare = srv.http.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert bare["tokens"] == srv.tok.render_chat(msgs, False)[0]
    assert bare["tokens"][-1] != srv.tok.assistant_id and off["tokens"][-1] == srv.tok.assistant_id


def test_detokenize_round_trip(srv):
    ids = srv.tok.render_chat([{"role": "user", "content": "Hello there"}], True, think=True)[0]
    r = srv.http.post("/detokenize", json={"model": "nanoseek", "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": srv.tok.decode(ids)}
    assert r.json()["prompt"].endswith("<|assistant|><think>\n")
    assert srv.http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_tokenize_errors(srv):
    vocab = srv.tok.vocab_size
    r = srv.http.post("/detokenize", json={"tokens": [1, vocab, -3]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "tokens" and str(vocab) in err["message"] and "-3" in err["message"]
    for body, param in (({}, "prompt"), ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "messages")):
        r = srv.http.post("/tokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = srv.http.post("/tokenize", json={"prompt": "x", "model": "gpt-9"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"
    r = srv.http.post("/tokenize", json={"prompt": "x", "thinking": "maybe"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "thinking"
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert httpx.post(srv.url + path, json=body).status_code == 401
        assert httpx.post(srv.url + path, json=body, headers={"Authorization": "Bearer sk-wrong"}).status_code == 401


# ------------------------------------------------------------------------------ list prompts
def _complete(srv, **kw):
    body = {"model": "nanoseek", "max_tokens": 2, "temperature": 0, **kw}
    r = srv.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _ids(srv, text):
    return srv.tok.encode(text, True, False)  # as /v1/completions encodes a string prompt


@pytest.mark.parametrize("shape", ["strings", "token lists", "mixed order"])
def test_list_prompts_one_choice_each_in_order_usage_summed(srv, shape):
    prompts = {"strings": ["Let", "The", "Let"],
               "token lists": [_ids(srv, "Let"), _ids(srv, "The"), _ids(srv, "Let")],
               "mixed order": ["The", "Let", "The"]}[shape]
    body = _complete(srv, prompt=prompts)
    want = {"Let": " me think", "The": " answer is"}
    names = ["The", "Let", "The"] if shape == "mixed order" else ["Let", "The", "Let"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [want[n] for n in names]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    u = body["usage"]
    assert u["prompt_tokens"] == sum(len(_ids(srv, n)) for n in names)
    assert u["completion_tokens"] == 6 and u["total_tokens"] == u["prompt_tokens"] + 6
    assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]


def test_single_token_list_is_one_prompt(srv):
    body = _complete(srv, prompt=_ids(srv, "Let"))
    assert [c["text"] for c in body["choices"]] == [" me think"]
    assert body["usage"]["prompt_tokens"] == len(_ids(srv, "Let"))


def test_list_prompts_echo_and_logprobs(srv):
    body = _complete(srv, prompt=["Let", "The"], echo=True, logprobs=1)
    assert [c["text"] for c in body["choices"]] == ["Let me think", "The answer is"]
    ids = _complete(srv, prompt=[_ids(srv, "Let"), _ids(srv, "The")], echo=True)
    # a token list is echoed as it decodes, <|bos|> included
    assert [c["text"] for c in ids["choices"]] == [srv.tok.decode(_ids(srv, "Let")) + " me think",
                                                  srv.tok.decode(_ids(srv, "The")) + " answer is"]
    lps = [c["logprobs"] for c in body["choices"]]
    # echo: the prompt's tokens (the first unscored) before the completion's
    assert [lp["tokens"] for lp in lps] == [["<|bos|>", "Let", " me", " think"], ["<|bos|>", "The", " answer", " is"]]
    assert all(lp["token_logprobs"][0] is None for lp in lps)
    assert all(-1.0 < x <= 0.0 for lp in lps for x in lp["token_logprobs"][2:])  # the scripted chain's margin


def test_list_prompts_stream_by_index(srv):
    body = {"model": "nanoseek", "max_tokens": 2, "temperature": 0, "prompt": ["Let", "The"], "stream": True,
            "stream_options": {"include_usage": True}}
    texts, finish, usage = {}, {}, None
    with srv.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for ln in r.iter_lines():
            if not ln.startswith("data: ") or ln == "data: [DONE]":
                continue
            chunk = json.loads(ln[len("data: "):])
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                finish[c["index"]] = c["finish_reason"] or finish.get(c["index"])
    assert texts == {0: " me think", 1: " answer is"} and finish == {0: "length", 1: "length"}
    assert usage["completion_tokens"] == 4
    assert usage["prompt_tokens"] == len(_ids(srv, "Let")) + len(_ids(srv, "The"))


def test_openai_client_list_prompts(srv):
    r = srv.client.completions.create(model="nanoseek", prompt=["Let", "The"], max_tokens=2, temperature=0)
    assert [(c.index, c.text) for c in r.choices] == [(0, " me think"), (1, " answer is")]


@pytest.mark.parametrize("prompt, param", [([], "prompt"), ([""], "prompt"), ([[]], "prompt"),
                                           (["x"] * 65, "prompt"), ([[1], [10**6]], "prompt[1]"),
                                           ([1, 10**6], "prompt")])
def test_bad_list_prompts_are_422_naming_the_field(srv, prompt, param):
    r = srv.http.post("/v1/completions", json={"model": "nanoseek", "prompt": prompt})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


# ------------------------------------------------------------------------------ n
def _chat_n(srv, **kw):
    kw.setdefault("temperature", 0)
    return srv.client.chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": "Hello there"}],
                                              **kw)


def _texts(r):
    return [(c.message.model_extra.get("reasoning_content") if c.message.model_extra else None,
             c.message.content) for c in r.choices]


def test_n_greedy_choices_are_identical_usage_counts_the_prompt_once(srv):
    r = _chat_n(srv, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == CONTENT and c.finish_reason == "stop" for c in r.choices)
    assert {c.message.model_extra["reasoning_content"] for c in r.choices} == {REASONING}
    prompt = srv.tok.render_chat([{"role": "user", "content": "Hello there"}], True)[0]
    u = r.usage
    assert u.prompt_tokens == len(prompt) and u.completion_tokens == 3 * CHAIN_LEN
    assert u.total_tokens == len(prompt) + 3 * CHAIN_LEN
    assert u.completion_tokens_details.reasoning_tokens == 3 * 6


def test_n_sampled_choice_k_is_seed_plus_k(srv):
    kw = {"temperature": 1.8, "max_tokens": 12}
    r = _chat_n(srv, n=3, seed=40, **kw)
    singles = [_texts(_chat_n(srv, seed=40 + k, **kw))[0] for k in range(3)]
    assert _texts(r) == singles
    assert len(set(singles)) > 1  # different seeds' texts
    assert _texts(_chat_n(srv, n=3, seed=40, **kw)) == singles  # the request repeats
    assert r.usage.completion_tokens == sum(c.usage.completion_tokens for c in
                                            (_chat_n(srv, seed=40 + k, **kw) for k in range(3)))


def test_n_stream_interleaves_choices_by_index(srv):
    kw = {"temperature": 1.8, "max_tokens": 12, "seed": 40}
    full = _chat_n(srv, n=3, **kw)
    want = _texts(full)
    stream = _chat_n(srv, n=3, stream=True, stream_options={"include_usage": True}, **kw)
    order, got, finish, usage = [], {}, {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            rc = (c.delta.model_extra or {}).get("reasoning_content")
            r0, c0 = got.get(c.index, (None, ""))
            if rc:
                r0 = (r0 or "") + rc
            got[c.index] = (r0, c0 + (c.delta.content or ""))
            if rc or c.delta.content:
                order.append(c.index)
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert [got[k] for k in range(3)] == [(r or None, t) for r, t in want]
    assert set(finish) == {0, 1, 2} and all(finish.values())
    assert order != sorted(order)  # the choices' chunks interleave as the engine decodes them together
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, full.usage.completion_tokens)


def test_n_with_list_prompts_orders_prompt_major(srv):
    body = _complete(srv, prompt=["Let", "The"], n=2)
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, " me think"), (1, " me think"), (2, " answer is"), (3, " answer is")]
    u = body["usage"]
    assert u["prompt_tokens"] == len(_ids(srv, "Let")) + len(_ids(srv, "The")) and u["completion_tokens"] == 8


def test_n_bounds(srv):
    r = _chat(srv, n=17)
    assert r.status_code == 422 and r.json()["error"]["param"] == "n"
    assert "16" in r.json()["error"]["message"]
    r = srv.http.post("/v1/completions", json={"model": "nanoseek", "prompt": ["a"] * 5, "n": 16})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "64" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------ /v1/models/{id}, vLLM's metric names
def test_model_by_id(srv):
    card = srv.client.models.retrieve("deepseek-reasoner")
    assert card.id == "deepseek-reasoner" and card.max_model_len == srv.engine.max_context
    with pytest.raises(openai.NotFoundError) as e:
        srv.client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


def _series(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_also_under_vllm_names(srv):
    from nanoseek.serve.metrics import VLLM_NAMES

    for _ in srv.client.chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": "Hi"}],
                                                temperature=0, stream=True):
        pass
    m = _series(srv.http.get("/metrics").text)
    assert m["nanoseek_inter_token_latency_seconds_count"] >= CHAIN_LEN - 1  # one per token after the first
    for ours, theirs in VLLM_NAMES.items():
        for name in (theirs,) if isinstance(theirs, str) else theirs:
            mine = {k: v for k, v in m.items() if k.startswith("nanoseek_" + ours)}
            if not mine:  # speculative decoding is off here: no spec_decode series under either name
                assert not any(k.startswith(name) for k in m), name
                continue
            for k, v in mine.items():
                assert m[name + k[len("nanoseek_" + ours):]] == v, (k, name)
    assert m["vllm:prefix_cache_queries_total"] == m["nanoseek_prompt_tokens_total"] > 0


@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "logit_bias", {"42": 5}), ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", "auto"), ("/v1/chat/completions", "audio", {"voice": "alloy"}),
    ("/v1/chat/completions", "modalities", ["text", "audio"]), ("/v1/chat/completions", "web_search_options", {}),
    ("/v1/completions", "logit_bias", {"42": -100}), ("/v1/completions", "best_of", 3)])
def test_fields_that_would_change_the_answer_unseen_are_400(srv, path, field, value):
    body = {"model": "nanoseek", "max_tokens": 2, field: value}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    r = srv.http.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    harmless = {"logit_bias": {}, "modalities": ["text"], "best_of": 1}
    if field in harmless:
        assert srv.http.post(path, json={**body, field: harmless[field]}).status_code == 200
