"""Structured output through the official ``openai`` client: ``response_format`` ``json_object`` and
``json_schema`` are enforced by the engine's grammar mask on a tiny random model whose unconstrained
output is noise. 200 sampled choices at temperature 1 each parse as JSON (and validate against the
schema); a reply cut short by max_tokens says "length", never passes for a finished object."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import jsonschema
import openai
import pytest
import torch

from nanoseek.config import preset
from nanoseek.engine import Engine
from nanoseek.model import DeepSeekV3
from nanoseek.serve import ServeConfig, create_app
from nanoseek.serve.testing import ServerThread
from nanoseek.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                  "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                 "required": ["name", "age"], "additionalProperties": False},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "ok": {"type": "boolean"},
    },
    "required": ["user", "unit", "tags"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Give me the record as JSON."}]


def _json_corpus(n=400, seed=0) -> list[str]:
    """JSON documents to train the vocabulary on: a real tokenizer has quote and bracket tokens."""
    rng = random.Random(seed)
    words = "name age city tags items id value ok true false null weather unit user the a of".split()

    def val(d=0):
        r = rng.random()
        if r < .3 and d < 2:
            return {rng.choice(words): val(d + 1) for _ in range(rng.randint(1, 3))}
        if r < .45 and d < 2:
            return [val(d + 1) for _ in range(rng.randint(0, 3))]
        if r < .7:
            return " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        return rng.randint(0, 999) if r < .9 else rng.choice([True, False, None])

    return [json.dumps({rng.choice(words): val() for _ in range(3)}) for _ in range(n)] + \
        [m["content"] for m in MESSAGES] * 20


@pytest.fixture(scope="module")
def srv():
    tok = Tokenizer.train(_json_corpus(), vocab_size=400)
    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=1280))
    engine = Engine(model, tok, max_num_seqs=128, max_batch_tokens=4096)
    app = create_app(engine, ServeConfig(ckpt=".", max_num_seqs=128))
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        yield SimpleNamespace(client=client, engine=engine, tok=tok)


def _sample(srv, requests: int, n: int, **kw) -> list:
    """`requests` chat requests of `n` choices each, all in flight at once (one engine batch)."""
    def one(i):
        return srv.client.chat.completions.create(model="nanoseek", messages=MESSAGES, temperature=1.0, n=n,
                                                  seed=1000 * i, max_tokens=1200, **kw).choices
    with ThreadPoolExecutor(requests) as pool:
        return [c for choices in pool.map(one, range(requests)) for c in choices]


def test_unconstrained_output_is_noise(srv):
    choices = srv.client.chat.completions.create(model="nanoseek", messages=MESSAGES, temperature=1.0, n=8, seed=3,
                                                 max_tokens=60).choices
    for c in choices:
        with pytest.raises(ValueError):
            json.loads(c.message.content)


def test_json_object_200_sampled_choices_all_parse(srv):
    choices = _sample(srv, 20, 10, response_format={"type": "json_object"})
    assert len(choices) == 200
    for c in choices:
        assert c.finish_reason == "stop", c.message.content[:200]
        assert isinstance(json.loads(c.message.content), dict)
    assert len({c.message.content for c in choices}) > 150  # sampled, not one fixed object


def test_json_schema_200_sampled_choices_all_validate(srv):
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
    choices = _sample(srv, 20, 10, response_format=fmt)
    assert len(choices) == 200
    units = set()
    for c in choices:
        assert c.finish_reason == "stop"
        obj = json.loads(c.message.content)
        jsonschema.validate(obj, SCHEMA)
        units.add(obj["unit"])
    assert units == {"celsius", "fahrenheit"}


def test_json_schema_streamed_and_greedy(srv):
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}
    full = srv.client.chat.completions.create(model="nanoseek", messages=MESSAGES, temperature=0,
                                              response_format=fmt, max_tokens=600)
    stream = srv.client.chat.completions.create(model="nanoseek", messages=MESSAGES, temperature=0,
                                                response_format=fmt, max_tokens=600, stream=True)
    parts, finish = [], None
    for chunk in stream:
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(full.choices[0].message.content), SCHEMA)


def test_out_of_tokens_is_length_never_a_finished_object(srv):
    c = srv.client.chat.completions.create(model="nanoseek", messages=MESSAGES, temperature=1.0, seed=5, n=4,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "r", "schema": SCHEMA}},
                                           max_tokens=6)
    for ch in c.choices:
        assert ch.finish_reason == "length"
        assert ch.message.content.startswith('{"user":')
        with pytest.raises(ValueError):
            json.loads(ch.message.content)


@pytest.mark.parametrize("fmt, status", [
    ({"type": "json_schema"}, 422),                                               # no json_schema object
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "wat"}}}, 400),  # not compilable
    ({"type": "xml"}, 422),
])
def test_bad_response_format_is_a_clear_error(srv, fmt, status):
    with pytest.raises(openai.APIStatusError) as e:
        srv.client.chat.completions.create(model="nanoseek", messages=MESSAGES, response_format=fmt, max_tokens=4)
    assert e.value.status_code == status
    assert "response_format" in str(e.value.body)
