"""`/v1/completions` scoring a prompt as evaluation harnesses ask it to: ``echo`` with ``logprobs``
returns the prompt's own token log-probs (the first null) before the completion's, and
``max_tokens: 0`` with ``echo`` scores without generating.

A random tiny checkpoint (tests/conftest.py): its log-probs are far from 0 and from each other, so
comparing them with the model's own forward checks the right position and token are read.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
import torch

from nanoseek.serve import ServeConfig, create_app
from nanoseek.serve.testing import ServerThread

engine_mod = pytest.importorskip("nanoseek.engine")
pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "12+7=19"


@pytest.fixture(scope="module")
def srv(ckpt):
    engine = engine_mod.Engine(str(ckpt), device="cpu", block_size=16, max_num_seqs=4)
    app = create_app(engine, ServeConfig(ckpt=str(ckpt), max_num_seqs=4))
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield SimpleNamespace(engine=engine, tok=engine.tokenizer, http=http)


def _complete(srv, **kw):
    return srv.http.post("/v1/completions", json={"model": "nanoseek", "temperature": 0, **kw})


def _forward_logprobs(srv, ids: list[int]) -> torch.Tensor:
    """log p(· | t_<i+1) at every position from the model's own full forward, float32."""
    with torch.no_grad():
        return srv.engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)


def _check_prompt_part(srv, lp: dict, ids: list[int], top: int) -> None:
    T = len(ids)
    ref = _forward_logprobs(srv, ids)
    assert lp["tokens"][:T] == [srv.tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = ref[torch.arange(T - 1), torch.tensor(ids[1:])]
    got = torch.tensor(lp["token_logprobs"][1:T])
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert (want < -0.5).any()  # a random model: the comparison is not between zeros
    for i in range(1, T):
        v, j = ref[i - 1].topk(top)
        assert lp["top_logprobs"][i] == pytest.approx({srv.tok.decode([t]): x for t, x in zip(j.tolist(), v.tolist())},
                                                      abs=1e-4)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_returns_the_prompts_log_probs(srv, max_tokens):
    r = _complete(srv, prompt=TEXT, echo=True, logprobs=2, max_tokens=max_tokens)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = srv.tok.encode(TEXT, True, False)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    _check_prompt_part(srv, lp, ids, top=2)
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == max_tokens and choice["finish_reason"] == "length"
    text = choice["text"]
    assert text.startswith(TEXT) and (max_tokens or text == TEXT)
    # the string's own text holds every token after the <|bos|> the server added, at its offset
    assert lp["text_offset"][:2] == [0, 0]
    for tok, off in zip(lp["tokens"][1:], lp["text_offset"][1:]):
        assert text[off:off + len(tok)] == tok
    if max_tokens:  # the greedy token's log-prob (paged cache) is the full forward's best at the end
        assert lp["token_logprobs"][-1] == pytest.approx(_forward_logprobs(srv, ids)[-1].max().item(), abs=1e-3)


def test_token_prompts_and_lists_are_scored_each(srv):
    a, b = srv.tok.encode("3*4=12", True, False), srv.tok.encode("9-2", False, False)
    r = _complete(srv, prompt=[a, b], echo=True, logprobs=1, max_tokens=0, n=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 4 and body["usage"]["prompt_tokens"] == len(a) + len(b)
    assert body["usage"]["completion_tokens"] == 0
    for choice, ids in zip(body["choices"], [a, a, b, b]):
        _check_prompt_part(srv, choice["logprobs"], ids, top=1)
        text = choice["text"]
        assert text == srv.tok.decode(ids)  # a token list is echoed as it decodes, <|bos|> included
        for tok, off in zip(choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]):
            assert text[off:off + len(tok)] == tok


def test_max_tokens_zero_needs_echo(srv):
    r = _complete(srv, prompt=TEXT, max_tokens=0, logprobs=1)
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
    assert "echo" in r.json()["error"]["message"]
    chat = srv.http.post("/v1/chat/completions", json={"model": "nanoseek", "max_tokens": 0,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 422 and chat.json()["error"]["param"] == "max_tokens"


def test_echo_without_logprobs_scores_nothing(srv):
    body = _complete(srv, prompt=TEXT, echo=True, max_tokens=0).json()
    assert body["choices"][0]["text"] == TEXT and body["choices"][0]["logprobs"] is None
    assert body["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("extra", [{"logprobs": 1, "max_tokens": 1}, {"max_tokens": 0}])
def test_streamed_scoring_is_a_clear_400(srv, extra):
    r = _complete(srv, prompt=TEXT, echo=True, stream=True, **extra)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    assert "not supported when streaming" in r.json()["error"]["message"]


def test_streamed_completion_offsets_run_on(srv):
    body = {"model": "nanoseek", "prompt": TEXT, "max_tokens": 3, "temperature": 0, "logprobs": 0, "stream": True}
    tokens, offsets = [], []
    with srv.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for ln in r.iter_lines():
            if ln.startswith("data: {"):
                lp = json.loads(ln[6:])["choices"][0]["logprobs"]
                if lp:
                    tokens += lp["tokens"]
                    offsets += lp["text_offset"]
    assert len(tokens) == 3
    assert offsets == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]
