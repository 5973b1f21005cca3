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
