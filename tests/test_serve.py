"""`nanoseek serve` end to end: real engine, real uvicorn on 127.0.0.1, the official openai client.

The checkpoint is a tiny random DeepSeek-V3 whose embedding/head are wired so that greedy
decoding follows a fixed chain (nanoseek.serve.testing): it writes
``<think>\\nLet me think</think>The answer is yes.<|eos|>`` by itself, which is what lets these
tests assert exact reasoning_content, content and token counts through the whole stack.
"""

from __future__ import annotations

import json
import logging
import re
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from nanoseek.serve import ServeConfig, create_app
from nanoseek.serve.testing import CONTENT, REASONING, ServerThread, make_scripted_checkpoint

engine_mod = pytest.importorskip("nanoseek.engine")
KEY = "sk-test-0123456789"
# <think> \n Let me think </think> The answer is yes . <|eos|>
CHAIN_LEN, CHAIN_REASONING = 12, 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_scripted_checkpoint(tmp_path_factory.mktemp("serve") / "scripted")


def _start(ckpt, **cfg_kw):
    engine_kw = {k: cfg_kw.pop(k) for k in ("max_num_seqs",) if k in cfg_kw}
    engine = engine_mod.Engine(str(ckpt), device="cpu", block_size=16, **engine_kw)
    cfg = ServeConfig(ckpt=str(ckpt), api_key=[KEY], **cfg_kw, **engine_kw)
    app = create_app(engine, cfg)
    return engine, cfg, app


@pytest.fixture(scope="module")
def srv(ckpt):
    engine, cfg, app = _start(ckpt, max_num_seqs=8, keepalive_s=0.5)
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, engine=engine, cfg=cfg, client=client)


def _chat(srv, content="Hello there", **kw):
    kw.setdefault("model", "nanoseek")
    kw.setdefault("temperature", 0)
    return srv.client.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)


def _cache_idle(engine) -> bool:
    # cache_usage counts blocks held by live requests (prefix-cached free blocks are not held)
    return engine.num_running == 0 and engine.num_waiting == 0 and engine.cache_usage == 0


def _wait(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------------- happy paths
def test_chat_reasoning_content_and_usage(srv):
    r = _chat(srv)
    msg = r.choices[0].message
    assert msg.reasoning_content == REASONING
    assert msg.content == CONTENT
    assert r.choices[0].finish_reason == "stop"
    prompt = srv.engine.tokenizer.render_chat([{"role": "user", "content": "Hello there"}], True)[0]
    u = r.usage
    assert u.prompt_tokens == len(prompt)
    assert u.completion_tokens == CHAIN_LEN
    assert u.completion_tokens_details.reasoning_tokens == CHAIN_REASONING
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    extra = u.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == u.prompt_tokens
    cost = extra["cost"]
    expect = (extra["prompt_cache_hit_tokens"] * 0.14 + extra["prompt_cache_miss_tokens"] * 0.55
              + CHAIN_LEN * 2.19) / 1e6
    assert cost["total"] == pytest.approx(expect, rel=1e-9)
    assert cost["currency"] == "USD"


def test_stream_reasoning_first_then_content_then_done(srv):
    """deepseek-reasoner pre-opens <think> in the template: the chain is entered inside the trace."""
    stream = _chat(srv, model="deepseek-reasoner", stream=True, stream_options={"include_usage": True})
    kinds, reasoning, content, finish, usage = [], "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            rc = (d.model_extra or {}).get("reasoning_content")
            if rc:
                kinds.append("r")
                reasoning += rc
            if d.content:
                kinds.append("c")
                content += d.content
            finish = c.finish_reason or finish
    assert reasoning == REASONING and content == CONTENT and finish == "stop"
    assert "r" in kinds and "c" in kinds
    assert kinds.index("c") > len(kinds) - 1 - kinds[::-1].index("r")  # every reasoning chunk before content
    assert usage is not None and usage.completion_tokens == CHAIN_LEN - 2  # <think>\n were in the prompt
    assert usage.completion_tokens_details.reasoning_tokens == CHAIN_REASONING - 2


def test_raw_sse_ends_with_done(srv):
    body = {"model": "nanoseek", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "temperature": 0}
    with httpx.stream("POST", srv.url + "/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: "):])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_prefix_cache_hits_on_repeated_long_prefix(srv):
    system = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Tell me."}]
    first = srv.client.chat.completions.create(model="nanoseek", messages=msgs, temperature=0)
    second = srv.client.chat.completions.create(model="nanoseek", messages=msgs, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 100
    hit = second.usage.model_extra["prompt_cache_hit_tokens"]
    assert hit > 0 and hit % 16 == 0  # the engine matches whole 16-token blocks from token 0
    assert hit >= second.usage.prompt_tokens - 16 - 1
    assert second.usage.prompt_tokens_details.cached_tokens == hit
    # the cache hit is billed at the cheaper price
    assert second.usage.model_extra["cost"]["total"] < first.usage.model_extra["cost"]["total"]
    assert second.choices[0].message.content == CONTENT


def test_stop_sequence(srv):
    r = _chat(srv, stop=[" yes"])
    assert r.choices[0].message.content == "The answer is"
    assert r.choices[0].finish_reason == "stop"


def test_max_tokens(srv):
    r = _chat(srv, max_tokens=3)  # <think> \n Let
    assert r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.reasoning_content == "Let"
    assert r.choices[0].message.content == ""


def test_seed_makes_sampling_repeatable(srv):
    def sample(seed):
        r = _chat(srv, temperature=1.8, max_tokens=16, seed=seed)
        m = r.choices[0].message
        return (m.reasoning_content, m.content, r.usage.completion_tokens)

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c


def test_degenerate_sampling_values_are_served_greedily(srv):
    """temperature 1e-300 would turn logits into inf/NaN and fail the engine's whole batch."""
    for kw in ({"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1.0, "top_p": 0}):
        r = _chat(srv, **kw)
        assert r.choices[0].message.content == CONTENT, kw


def test_completions_endpoint(srv):
    r = srv.client.completions.create(model="nanoseek", prompt="Let", max_tokens=2, temperature=0)
    assert r.choices[0].text == " me think"
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


def test_models_health_metrics(srv):
    ids = [m.id for m in srv.client.models.list().data]
    assert ids[0] == "nanoseek" and "deepseek-reasoner" in ids
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["max_context"] == srv.engine.max_context
    _chat(srv)
    text = httpx.get(srv.url + "/metrics").text
    ok = re.search(r'nanoseek_requests_total\{endpoint="/v1/chat/completions",status="200"\} (\d+)', text)
    assert ok and int(ok[1]) >= 1
    cost = sum(float(v) for v in re.findall(r"nanoseek_cost_usd_total\{kind=\"\w+\"\} (\S+)", text))
    assert cost > 0
    assert re.search(r'nanoseek_request_latency_seconds_bucket\{le="\+Inf"\} [1-9]', text)
    assert "nanoseek_queue_depth 0" in text


# --------------------------------------------------------------------------------- errors
def test_wrong_key_is_401(srv):
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="nanoseek", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.get(srv.url + "/v1/models")  # no header at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_malformed_json_is_400(srv):
    r = httpx.post(srv.url + "/v1/chat/completions", content=b'{"model": "nanoseek", "messages": [',
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and set(err) >= {"message", "type", "code"}


def test_out_of_range_parameter_is_422(srv):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        _chat(srv, temperature=3.5)
    assert e.value.status_code == 422 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError):
        _chat(srv, stop=[f"s{i}" for i in range(17)])


def test_prompt_longer_than_context_is_400(srv):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(srv, content="fox " * (srv.engine.max_context + 10))
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"


def test_unknown_model_and_sent_back_reasoning_are_400(srv):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(srv, model="gpt-9")
    assert e.value.body["code"] == "model_not_found" and "nanoseek" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(model="nanoseek", messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yes", "reasoning_content": "Let me think"},
            {"role": "user", "content": "again"}])
    assert "reasoning_content" in e.value.body["message"]


# --------------------------------------------------------------------------------- robustness
def test_disconnect_cancels_generation_and_frees_cache(srv):
    body = {"model": "nanoseek", "messages": [{"role": "user", "content": "go"}], "stream": True,
            "temperature": 0, "ignore_eos": True, "max_tokens": 200}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break  # leave mid-stream
    assert _wait(lambda: _cache_idle(srv.engine)), "the aborted request is still in the engine"
    text = httpx.get(srv.url + "/metrics").text
    assert re.search(r"nanoseek_aborted_requests_total [1-9]", text)
    assert "nanoseek_in_flight_requests 0" in text


def test_disconnect_cancels_non_streaming_generation(srv):
    step = srv.engine.step
    srv.engine.step = lambda: (time.sleep(0.01), step())[1]  # ≥ 2 s for 200 tokens
    try:
        body = {"model": "nanoseek", "messages": [{"role": "user", "content": "go on"}], "temperature": 0,
                "ignore_eos": True, "max_tokens": 200}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=0.5,
                       headers={"Authorization": f"Bearer {KEY}"})
        assert _wait(lambda: _cache_idle(srv.engine), timeout=1.5), "still generating for a client that left"
    finally:
        srv.engine.step = step


def test_keepalive_while_waiting_and_429_past_the_queue(ckpt):
    """One sequence at a time, one waiting: the waiter gets ': keep-alive', the next one a 429."""
    engine, cfg, app = _start(ckpt, max_num_seqs=1, max_queue=1, keepalive_s=0.05)
    step = engine.step  # a tiny model is too quick to keep anyone waiting: slow each step to 10 ms+
    engine.step = lambda: (time.sleep(0.01), step())[1]
    long_body = {"model": "nanoseek", "messages": [{"role": "user", "content": "go"}], "stream": True,
                 "temperature": 0, "ignore_eos": True, "max_tokens": 120}
    auth = {"Authorization": f"Bearer {KEY}"}
    with ServerThread(app) as url, httpx.Client(base_url=url, headers=auth, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=long_body) as a:
            a_lines = a.iter_lines()  # keep a reference: a dropped iterator closes the connection
            next(a_lines)  # A is admitted
            with http.stream("POST", "/v1/chat/completions", json=long_body) as b:
                lines = b.iter_lines()
                first = next(lines)
                assert first.startswith("data: ")  # the role chunk is sent at once
                seen_keepalive = False
                for ln in lines:
                    if ln == ": keep-alive":
                        seen_keepalive = True
                        break
                    if ln.startswith("data: ") and "reasoning_content" in ln:
                        break  # B got its turn before a keep-alive (should not happen while A runs)
                assert seen_keepalive
                c = http.post("/v1/chat/completions", json={**long_body, "stream": False})
                assert c.status_code == 429 and c.headers["Retry-After"] == "1"
                assert c.json()["error"]["code"] == "rate_limit_exceeded"
        assert _wait(lambda: _cache_idle(engine))


def test_api_key_never_logged(ckpt, caplog):
    engine, cfg, app = _start(ckpt)
    server = ServerThread(app, log_level="debug")  # uvicorn's logging is configured here
    loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error", "nanoseek.serve")]
    for lg in loggers:  # uvicorn's loggers do not propagate to the root, where caplog listens
        lg.addHandler(caplog.handler)
    try:
        with caplog.at_level("DEBUG"), server as url:
            httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sk-leaked-guess"})
    finally:
        for lg in loggers:
            lg.removeHandler(caplog.handler)
    assert '"GET /v1/models HTTP/1.1" 200' in caplog.text  # the access log did run…
    assert '"GET /v1/models HTTP/1.1" 401' in caplog.text
    assert KEY not in caplog.text and "sk-leaked-guess" not in caplog.text  # …without the keys


def test_cli_flags(tmp_path):
    from nanoseek.cli import build_parser

    args = build_parser().parse_args(["serve", "--ckpt", str(tmp_path), "--port", "0", "--api-key", "a", "b",
                                      "--price-output", "1.1"])
    assert args.api_key == ["a", "b"] and args.port == 0 and args.price_output == 1.1
