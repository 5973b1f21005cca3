"""Bounded fuzz of the request schema: schemathesis generates bodies from the app's own OpenAPI
document (valid and invalid ones) and sends them to a real server; none may get a 500, and every
error must be in OpenAI's shape.

Bounded twice: a fixed number of examples per operation, and ``max_tokens_limit`` on the server so
a generated ``max_tokens: 10**9`` cannot turn one example into a long generation.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from nanoseek.serve import ServeConfig, create_app
from nanoseek.serve.testing import ServerThread, make_scripted_checkpoint

engine_mod = pytest.importorskip("nanoseek.engine")
schemathesis = pytest.importorskip("schemathesis")
KEY = "sk-fuzz"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    ckpt = make_scripted_checkpoint(tmp_path_factory.mktemp("fuzz") / "scripted")
    engine = engine_mod.Engine(str(ckpt), device="cpu")
    app = create_app(engine, ServeConfig(ckpt=str(ckpt), api_key=[KEY], max_tokens_limit=4))
    with ServerThread(app) as url:
        yield url


def test_no_500s(server_url):
    # schemathesis' own pytest plugin does not run under this pytest; driving its strategies with
    # hypothesis directly is the same fuzz without the plugin.
    from hypothesis import given

    schema = schemathesis.openapi.from_url(server_url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    posts = [op for op in ops if op.method.upper() == "POST"]
    assert {op.path for op in posts} == {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"}
    def known_model(case):
        # a random model name is a 400 before anything else runs; name a served one to reach the engine
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "nanoseek"
        return case

    runs = [(op, schemathesis.GenerationMode.POSITIVE, 30 if op in posts else 3) for op in ops]
    runs += [(op, schemathesis.GenerationMode.NEGATIVE, 20) for op in posts]  # schema-violating bodies
    for op, mode, n in runs:
        @given(case=op.as_strategy(generation_mode=mode).map(known_model))
        @settings(max_examples=n, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=server_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            assert response.status_code < 500, (f"{case.method} {case.path} → {response.status_code}: "
                                                f"{response.text[:500]}\nbody: {case.body!r}")
            if response.status_code >= 400:
                err = response.json()["error"]
                assert {"message", "type", "code"} <= set(err), err
            if response.status_code == 200 and "text/event-stream" in response.headers.get("content-type", ""):
                assert response.text.rstrip().endswith("data: [DONE]")

        check()


def _schemas():
    """JSON schemas, plausible and not: nested objects and arrays of typed leaves, enums, an unknown
    type, junk keywords, a bare ``{}``."""
    from hypothesis import strategies as st

    leaf = st.sampled_from([{"type": "string"}, {"type": "integer", "minimum": 0}, {"type": "number"},
                            {"type": "boolean"}, {"type": "null"}, {"enum": ["a", "b", 3]}, {"type": "wat"},
                            {"const": "x"}, {}, {"type": "string", "pattern": "[a-z]+"}, {"$ref": "#/nowhere"}])
    names = st.text("abcxyz_", min_size=1, max_size=4)
    return st.recursive(leaf, lambda inner: st.one_of(
        st.builds(lambda props, req: {"type": "object", "properties": props,
                                      "required": [k for k in props if req], "additionalProperties": False},
                  st.dictionaries(names, inner, max_size=3), st.booleans()),
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, inner, st.integers(-1, 3)),
        st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=3), max_size=3)), max_leaves=6)


def test_structured_output_and_tool_fields_no_500s(server_url):
    """response_format, tools and tool_choice (all four kinds), token_healing and prefix together,
    with random schemas: every answer is a 200 or an error in OpenAI's shape, never a 500."""
    import httpx
    from hypothesis import given
    from hypothesis import strategies as st

    fmt = st.one_of(st.none(), st.just({"type": "text"}), st.just({"type": "json_object"}),
                    st.builds(lambda s, strict: {"type": "json_schema", "json_schema": {"name": "r", "schema": s,
                                                                                         "strict": strict}},
                              _schemas(), st.booleans()))
    tool = st.builds(lambda name, s: {"type": "function", "function": {"name": name, "parameters": s}},
                     st.sampled_from(["f", "g", "get_weather"]), _schemas())
    choice = st.one_of(st.none(), st.sampled_from(["none", "auto", "required"]),
                       st.builds(lambda n: {"type": "function", "function": {"name": n}}, st.sampled_from(["f", "h"])))

    @given(fmt=fmt, tools=st.none() | st.lists(tool, max_size=2), choice=choice, heal=st.booleans(),
           prefix=st.booleans(), stream=st.booleans(), completion=st.booleans())
    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
              database=None)
    def check(fmt, tools, choice, heal, prefix, stream, completion):
        if completion:
            path, body = "/v1/completions", {"prompt": "Let me think", "token_healing": heal}
        else:
            msgs = [{"role": "user", "content": "Hi"}] + ([{"role": "assistant", "content": "The", "prefix": True}]
                                                          if prefix else [])
            path, body = "/v1/chat/completions", {"messages": msgs, "token_healing": heal}
            for k, v in (("response_format", fmt), ("tools", tools), ("tool_choice", choice)):
                if v is not None:
                    body[k] = v
        body.update(model="nanoseek", stream=stream, temperature=1.0, max_tokens=4)
        r = httpx.post(server_url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code < 500, (r.status_code, r.text[:500], body)
        if r.status_code >= 400:
            assert {"message", "type", "code"} <= set(r.json()["error"])
        elif stream:
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-500:]

    check()
