"""Tool calls through the official ``openai`` client, in DeepSeek-V3's format: ``tool_choice``
required / a named function yields a call whose arguments validate against the function's schema
(streamed and not), the result sent back is rendered into the template (checked on the ids, and
against transformers' rendering of the saved chat template), and the parser reads calls however
the text is cut.

Scripted checkpoint (nanoseek/serve/testing.py) with a longer context: its greedy reply is
``The answer is yes.``, which calls no tool; at temperature 1, off its chain, it writes noise —
so every valid call below is the grammar's doing.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest

from nanoseek.serve import ServeConfig, create_app
from nanoseek.serve.testing import CONTENT, ServerThread, make_scripted_checkpoint
from nanoseek.serve.tools import ToolCallParser
from nanoseek.tokenizer import (TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END,
                                TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_SEP)

engine_mod = pytest.importorskip("nanoseek.engine")
pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]},
                          "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 7},
                                   "maxItems": 3}},
           "required": ["city", "unit"], "additionalProperties": False}
LOOKUP = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"],
          "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "lookup", "parameters": LOOKUP}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    ckpt = make_scripted_checkpoint(tmp_path_factory.mktemp("tools") / "scripted", max_position_embeddings=1024)
    engine = engine_mod.Engine(str(ckpt), device="cpu", max_num_seqs=16)
    app = create_app(engine, ServeConfig(ckpt=str(ckpt), max_num_seqs=16))
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        yield SimpleNamespace(client=client, http=http, engine=engine, tok=engine.tokenizer, ckpt=ckpt)


def _create(srv, **kw):
    body = {"model": "nanoseek", "messages": ASK, "tools": TOOLS, "temperature": 1.0, "max_tokens": 300, **kw}
    return srv.client.chat.completions.create(**body)


def _schema(name):
    return {"get_weather": WEATHER, "lookup": LOOKUP}[name]


def test_required_yields_calls_that_validate(srv):
    r = _create(srv, tool_choice="required", n=6, seed=11)
    names = set()
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        assert c.message.content is None
        call, = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), _schema(call.function.name))
        names.add(call.function.name)
    assert names <= {"get_weather", "lookup"}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_calls_streamed_as_tool_call_deltas(srv, choice):
    stream = _create(srv, tool_choice=choice, seed=5, stream=True)
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                c["id"] += d.id or ""
                c["name"] += d.function.name or ""
                c["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and content == ""
    call, = calls.values()
    assert call["id"].startswith("call_")
    assert call["name"] == "get_weather" or (choice == "required" and call["name"] == "lookup")
    jsonschema.validate(json.loads(call["arguments"]), _schema(call["name"]))
    # the same request unstreamed writes the same call (same seed)
    full = _create(srv, tool_choice=choice, seed=5).choices[0].message.tool_calls[0].function
    assert (full.name, full.arguments) == (call["name"], call["arguments"])


def test_tool_result_round_trip_renders_in_the_template(srv):
    first = _create(srv, tool_choice="required", seed=2)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None,
                      "tool_calls": [{"id": call.id, "type": "function",
                                      "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                     {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"}]
    second = srv.client.chat.completions.create(model="nanoseek", messages=history, tools=TOOLS, temperature=0,
                                                max_tokens=40)
    assert second.choices[0].message.content == CONTENT and second.choices[0].finish_reason == "stop"
    # the rendered ids: what /tokenize counts is what the chat prefilled, and it is the template's
    ids = srv.http.post("/tokenize", json={"model": "nanoseek", "messages": history, "tools": TOOLS}).json()["tokens"]
    assert second.usage.prompt_tokens == len(ids)
    tok = srv.tok
    t = tok.tool_ids
    assert ids == tok.render_chat(history, add_generation_prompt=True, tools=TOOLS)[0]
    call_text = f"{call.function.name}\n```json\n{call.function.arguments}\n```"
    tail = ([tok.assistant_id, t[TOOL_CALLS_BEGIN], t[TOOL_CALL_BEGIN]] + tok.encode("function") + [t[TOOL_SEP]]
            + tok.encode(call_text) + [t[TOOL_CALL_END], t[TOOL_CALLS_END], tok.eos_id, t[TOOL_OUTPUTS_BEGIN],
                                       t[TOOL_OUTPUT_BEGIN]] + tok.encode("21 degrees and sunny")
            + [t[TOOL_OUTPUT_END], t[TOOL_OUTPUTS_END], tok.assistant_id])
    assert ids[-len(tail):] == tail
    # transformers renders the saved chat template to the same ids
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(srv.ckpt))
    out = hf.apply_chat_template(history, tools=TOOLS, tokenize=True, add_generation_prompt=True)
    assert list(out["input_ids"] if hasattr(out, "keys") else out) == ids


def test_auto_and_none(srv):
    auto = _create(srv, tool_choice="auto", temperature=0, max_tokens=40)
    assert auto.choices[0].message.content == CONTENT and auto.choices[0].message.tool_calls is None
    none = _create(srv, tool_choice="none", temperature=0, max_tokens=40)
    plain = srv.client.chat.completions.create(model="nanoseek", messages=ASK, temperature=0, max_tokens=40)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # tools are not shown
    assert none.choices[0].message.content == CONTENT


@pytest.mark.parametrize("kw, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400_naming_the_field(srv, kw, param):
    body = {"model": "nanoseek", "messages": ASK, "tools": TOOLS, "max_tokens": 4, **kw}
    r = srv.http.post("/v1/chat/completions", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_parser_reads_calls_cut_anywhere():
    text = (f"Let me check.{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n"
            f'{{"city": "Paris", "unit": "c"}}\n```{TOOL_CALL_END}\n{TOOL_CALL_BEGIN}function{TOOL_SEP}lookup\n'
            f'```json\n{{"q": "x"}}\n```{TOOL_CALL_END}{TOOL_CALLS_END}')
    for cut in (1, 3, 7, len(text)):
        p = ToolCallParser()
        content, calls = "", []
        for i in range(0, len(text), cut):
            c, new = p.feed(text[i:i + cut])
            content += c
            calls += new
        content += p.flush()
        assert content == "Let me check."
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("get_weather", {"city": "Paris", "unit": "c"}), ("lookup", {"q": "x"})]
    p = ToolCallParser(max_calls=1)  # parallel_tool_calls false: the first call only
    assert [c["function"]["name"] for c in p.feed(text)[1]] == ["get_weather"]
    p = ToolCallParser()  # a marker that never completes is content; an unfinished call block too
    assert p.feed("a <｜tool")[0] == "a " and p.flush() == "<｜tool"
    p = ToolCallParser()
    assert p.feed(TOOL_CALLS_BEGIN + "junk") == ("", []) and p.flush() == TOOL_CALLS_BEGIN + "junk"


def test_reasoner_thinks_freely_then_answers_in_the_grammar(srv):
    """With the reasoner template the grammar leaves the reasoning free up to </think>: the scripted
    chain still thinks "Let me think", and the answer is the constrained JSON / tool call."""
    r = srv.client.chat.completions.create(model="deepseek-reasoner", messages=ASK, temperature=0, max_tokens=300,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "w", "schema": WEATHER}})
    msg = r.choices[0].message
    assert msg.reasoning_content == "Let me think" and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(msg.content), WEATHER)
    r = _create(srv, model="deepseek-reasoner", temperature=0, tool_choice={"type": "function",
                                                                             "function": {"name": "lookup"}})
    assert r.choices[0].message.reasoning_content == "Let me think"
    jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments), LOOKUP)
