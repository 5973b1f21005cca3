"""Prometheus metrics, written in the text exposition format by hand.

Why by hand: the format is a few lines of text, and a per-app registry (instead of
prometheus_client's process-global one) lets tests start several servers in one process
without "duplicated timeseries" errors. Everything is updated from the event loop thread
only, so no locks are needed.

Names follow Prometheus conventions: ``_total`` counters, ``_seconds`` histograms, base units.
Where vLLM has a counterpart, the same series is also written under vLLM's name (``VLLM_NAMES``),
so dashboards and autoscalers written for vLLM read nanoseek unchanged.
"""

from __future__ import annotations

import math
from typing import Callable

Labels = tuple[tuple[str, str], ...]


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    esc = (lambda v: v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"'))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


def _fmt_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Counter:
    kind = "counter"

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self):
        for key, v in sorted(self.values.items()):
            yield self.name, key, v


class Gauge:
    """A gauge read at scrape time from a callback (queue depth, cache usage)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def readings(self) -> list:
        return [((), float(self.read()))]

    def samples(self):
        try:
            got = self.readings()
        except Exception:  # a scrape must never fail because one reading did
            got = [((), float("nan"))]
        for labels, v in got:
            yield self.name, labels, v


class ReadCounter(Gauge):
    """A counter kept elsewhere (the engine's), read at scrape time: `read()` → [(labels, value)]."""

    kind = "counter"

    def readings(self) -> list:
        return self.read()


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1  # the first bucket that holds v; made cumulative when written
                break

    def samples(self):
        cum = 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            yield self.name + "_bucket", (("le", _fmt_value(b)),), cum
        yield self.name + "_sum", (), self.sum
        yield self.name + "_count", (), self.count


class Alias:
    """Another metric's series under a second name (vLLM's)."""

    def __init__(self, name: str, of):
        self.name, self.of, self.kind = name, of, of.kind
        self.help = f"{of.help} (= {of.name})"

    def samples(self):
        for name, labels, v in self.of.samples():
            yield self.name + name[len(self.of.name):], labels, v


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# nanoseek's name (without its prefix) → vLLM's (its prefix-cache queries and hits count tokens:
# every prompt token is one query)
VLLM_NAMES = {
    "running_requests": "vllm:num_requests_running",
    "queue_depth": "vllm:num_requests_waiting",
    "kv_cache_usage_ratio": "vllm:kv_cache_usage_perc",  # a fraction in vLLM too, despite the name
    "prompt_tokens_total": ("vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total"),
    "completion_tokens_total": "vllm:generation_tokens_total",
    "prompt_cache_hit_tokens_total": "vllm:prefix_cache_hits_total",
    "time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "queue_time_seconds": "vllm:request_queue_time_seconds",
    "spec_decode_num_drafts_total": "vllm:spec_decode_num_drafts_total",
    "spec_decode_num_draft_tokens_total": "vllm:spec_decode_num_draft_tokens_total",
    "spec_decode_num_accepted_tokens_total": "vllm:spec_decode_num_accepted_tokens_total",
    "spec_decode_num_accepted_tokens_per_pos_total": "vllm:spec_decode_num_accepted_tokens_per_pos_total",
}


class ServeMetrics:
    """All the server's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float],
                 in_flight: Callable[[], float], cache_usage: Callable[[], float],
                 engine_stats: Callable[[], dict] | None = None):
        p = "nanoseek_"
        self.requests = Counter(p + "requests_total", "HTTP API requests by endpoint and status code")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "prompt tokens of finished requests")
        self.completion_tokens = Counter(p + "completion_tokens_total", "generated tokens")
        self.reasoning_tokens = Counter(p + "reasoning_tokens_total", "generated tokens inside <think>")
        self.cache_hit_tokens = Counter(p + "prompt_cache_hit_tokens_total", "prompt tokens served from the prefix cache")
        self.cache_miss_tokens = Counter(p + "prompt_cache_miss_tokens_total", "prompt tokens computed (prefill)")
        self.cost = Counter(p + "cost_usd_total", "metered cost in USD at the configured prices, by kind")
        self.aborted = Counter(p + "aborted_requests_total", "generations cancelled because the client went away")
        self.latency = Histogram(p + "request_latency_seconds", "end-to-end latency of generation requests",
                                 LATENCY_BUCKETS)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "time from request to first generated text",
                              LATENCY_BUCKETS)
        self.queue_time = Histogram(p + "queue_time_seconds", "time a request waited before its first event",
                                    LATENCY_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds", "time between a choice's consecutive generated tokens",
                             TOKEN_LATENCY_BUCKETS)
        self._all = [
            self.requests, self.prompt_tokens, self.completion_tokens, self.reasoning_tokens,
            self.cache_hit_tokens, self.cache_miss_tokens, self.cost, self.aborted,
            Gauge(p + "queue_depth", "requests waiting for the engine", queue_depth),
            Gauge(p + "running_requests", "requests the engine is generating", running),
            Gauge(p + "in_flight_requests", "requests admitted by the HTTP server and not finished", in_flight),
            Gauge(p + "kv_cache_usage_ratio", "fraction of KV-cache blocks held by requests", cache_usage),
            self.latency, self.ttft, self.queue_time, self.itl,
        ]
        if engine_stats is not None:  # speculative decoding, under vLLM's names
            def one(key):
                return lambda: [((), engine_stats()[key])]
            self._all += [
                ReadCounter(p + "spec_decode_num_drafts_total", "verifying steps of a request that carried drafts",
                            one("spec_num_drafts")),
                ReadCounter(p + "spec_decode_num_draft_tokens_total", "draft tokens verified",
                            one("spec_num_draft_tokens")),
                ReadCounter(p + "spec_decode_num_accepted_tokens_total", "draft tokens accepted",
                            one("spec_num_accepted_tokens")),
                ReadCounter(p + "spec_decode_num_accepted_tokens_per_pos_total",
                            "draft tokens accepted at each draft position (0 = the first)",
                            lambda: [((("position", str(i)),), v) for i, v in
                                     enumerate(engine_stats()["spec_num_accepted_tokens_per_pos"])]),
            ]

    def named_as_vllm(self) -> list[Alias]:
        out = []
        for m in self._all:
            names = VLLM_NAMES.get(m.name[len("nanoseek_"):], ())
            out += [Alias(n, m) for n in ((names,) if isinstance(names, str) else names)]
        return out

    def record_usage(self, prompt: int, hit: int, completion: int, reasoning: int, cost) -> None:
        self.prompt_tokens.inc(prompt)
        self.cache_hit_tokens.inc(hit)
        self.cache_miss_tokens.inc(prompt - hit)
        self.completion_tokens.inc(completion)
        self.reasoning_tokens.inc(reasoning)
        self.cost.inc(cost.prompt_cache_hit, kind="prompt_cache_hit")
        self.cost.inc(cost.prompt_cache_miss, kind="prompt_cache_miss")
        self.cost.inc(cost.completion, kind="completion")

    def render(self) -> str:
        lines: list[str] = []
        for m in self._all + self.named_as_vllm():
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            for name, labels, v in m.samples():
                lines.append(f"{name}{_fmt_labels(labels)} {_fmt_value(v)}")
        return "\n".join(lines) + "\n"
