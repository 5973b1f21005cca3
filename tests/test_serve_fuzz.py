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
