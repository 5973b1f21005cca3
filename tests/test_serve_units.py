"""Pure pieces of serve, without a server: the streaming <think> splitter, reasoning-token counts,
the Prometheus text format, request validation bounds and error mapping."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from nanoseek.serve.metrics import Counter, Histogram, ServeMetrics
from nanoseek.serve.protocol import ChatCompletionRequest
from nanoseek.serve.reasoning import ThinkSplitter, count_reasoning_tokens, split_reasoning

TRACE = "<think>\nLet me think.\nTwo lines.\n</think>\nThe answer is 4."


def _stream(text: str, cuts: list[int], in_think=False):
    s = ThinkSplitter(in_think)
    pieces, last = [], 0
    for c in cuts + [len(text)]:
        pieces += s.feed(text[last:c])
        last = c
    return pieces + s.flush()


def _join(pieces, kind):
    return "".join(t for k, t in pieces if k == kind)


def test_split_whole_text():
    assert split_reasoning(TRACE) == ("Let me think.\nTwo lines.", "The answer is 4.")
    assert split_reasoning("Plain answer.") == (None, "Plain answer.")
    # pre-opened by the template: the text starts inside the trace
    assert split_reasoning("Let me think.\n</think>\n4", in_think=True) == ("Let me think.", "4")
    # a trace cut off by max_tokens is all reasoning, no content
    assert split_reasoning("<think>\nstill going", in_think=False) == ("still going", "")


@pytest.mark.parametrize("seed", range(20))
def test_split_is_independent_of_where_the_stream_is_cut(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(TRACE)), rng.randint(1, 12)))
    pieces = _stream(TRACE, cuts)
    assert _join(pieces, "reasoning") == "Let me think.\nTwo lines."
    assert _join(pieces, "content") == "The answer is 4."
    kinds = [k for k, _ in pieces]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # all reasoning before any content


def test_marker_split_across_deltas_is_held_back_not_leaked():
    s = ThinkSplitter(in_think=True)
    assert s.feed("abc</thi") == [("reasoning", "abc")]  # "</thi" could still be the marker
    assert s.feed("nk>") == []
    assert s.feed("x") == [("content", "x")]
    s = ThinkSplitter(in_think=True)
    assert s.feed("a </th") == [("reasoning", "a")]  # blank + "</th" held until we know what follows
    assert s.feed("e") == [("reasoning", " </the")]  # not the marker after all: released in order


def test_start_state_waits_for_a_possible_think_tag():
    s = ThinkSplitter()
    assert s.feed("<th") == []
    assert s.feed("e") == [("content", "<the")]
    s = ThinkSplitter()
    assert s.feed("\n<think>") == []
    assert s.saw_think


def test_reasoning_token_counts():
    THINK, END = 6, 7
    assert count_reasoning_tokens([THINK, 10, 11, END, 12, 1], END, THINK, in_think=False) == 4
    assert count_reasoning_tokens([10, 11, END, 12], END, THINK, in_think=True) == 3
    assert count_reasoning_tokens([10, 11], END, THINK, in_think=True) == 2  # cut off inside the trace
    assert count_reasoning_tokens([10, 11, 12], END, THINK, in_think=False) == 0


def test_prometheus_text_format():
    h = Histogram("lat_seconds", "latency", (0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 3.0):
        h.observe(v)
    lines = list(h.samples())
    assert lines == [("lat_seconds_bucket", (("le", "0.1"),), 1), ("lat_seconds_bucket", (("le", "1"),), 3),
                     ("lat_seconds_bucket", (("le", "+Inf"),), 4), ("lat_seconds_sum", (), 4.05),
                     ("lat_seconds_count", (), 4)]
    c = Counter("req_total", "requests")
    c.inc(endpoint="/v1", status="200")
    c.inc(2, endpoint="/v1", status="200")
    assert c.get(endpoint="/v1", status="200") == 3
    m = ServeMetrics(lambda: 2, lambda: 1, lambda: 3, lambda: 1 / 0)
    m.requests.inc(endpoint="/x", status='4"00')
    text = m.render()
    assert 'nanoseek_requests_total{endpoint="/x",status="4\\"00"} 1' in text
    assert "nanoseek_queue_depth 2\n" in text
    assert "nanoseek_kv_cache_usage_ratio NaN\n" in text  # a failing reading does not fail the scrape
    assert "# TYPE nanoseek_request_latency_seconds histogram" in text


def _req(**kw):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **kw)


@pytest.mark.parametrize("field,value", [("temperature", 2.01), ("temperature", -0.1), ("top_p", 1.5),
                                         ("frequency_penalty", 2.5), ("presence_penalty", -3),
                                         ("max_tokens", 0), ("top_logprobs", 21), ("n", 0), ("n", 17),
                                         ("stop", [str(i) for i in range(17)]), ("stop", [""])])
def test_out_of_range_fields_are_rejected(field, value):
    with pytest.raises(ValidationError) as e:
        _req(**{field: value})
    assert e.value.errors()[0]["loc"][0] == field


def test_request_defaults_and_content_parts():
    r = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], stop="END", unknown_field=1)
    assert r.messages[0].text() == "ab" and r.stop == ["END"] and r.temperature == 1.0
    assert not _req().stop
