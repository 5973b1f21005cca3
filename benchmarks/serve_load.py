"""Load test of `nanoseek serve` on loopback: N concurrent streaming clients × M requests each.

    python benchmarks/serve_load.py                      # 32 clients × 4 requests, scripted tiny ckpt
    python benchmarks/serve_load.py --ckpt runs/x/sft --clients 8 --requests 2 --max-tokens 64

The server runs as a real `nanoseek serve` subprocess (so client and server do not share a GIL).
Every request streams with ``stream_options.include_usage``; all clients share a long system
prompt, so the prefix cache has something to hit. Afterwards the run is checked, not just timed:
zero errors, every request finished, and the server's /health shows nothing running, nothing
waiting and no KV-cache block still held. Prints throughput and p50/p95 latency as a markdown row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek.serve.testing import free_port, make_scripted_checkpoint  # noqa: E402

KEY = "sk-load-test"
SYSTEM = "You are a helpful assistant. Answer briefly and check your reasoning before you answer. " * 3


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def one_request(http: httpx.AsyncClient, client: int, i: int, args) -> dict:
    body = {"model": "nanoseek", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Client {client} question {i}: is it yes?"}],
            "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": client * 100 + i,
            "ignore_eos": args.ignore_eos}
    t0 = time.perf_counter()
    ttft, usage, done, finish = None, None, False, None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                d = c["delta"]
                if ttft is None and (d.get("content") or d.get("reasoning_content")):
                    ttft = time.perf_counter() - t0
                finish = c.get("finish_reason") or finish
    if not done or usage is None or finish is None:
        return {"error": f"incomplete stream (done={done}, usage={usage is not None}, finish={finish})"}
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "usage": usage}


async def client_loop(http, client, args, out):
    for i in range(args.requests):
        out.append(await one_request(http, client, i, args))


async def run_load(url: str, args) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits,
                                 headers={"Authorization": f"Bearer {KEY}"}) as http:
        results: list[dict] = []
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(http, c, args, results) for c in range(args.clients)))
        return results, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="checkpoint dir (default: a scripted tiny checkpoint in a temp dir)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="sequential requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate exactly max_tokens per request (a fixed workload)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.ckpt or str(make_scripted_checkpoint(Path(tmp.name) / "scripted"))
    port = free_port()
    cmd = [sys.executable, "-m", "nanoseek.cli", "serve", "--ckpt", ckpt, "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"]
    env = {**os.environ, "NANOSEEK_API_KEYS": KEY}
    log_path = Path(tmp.name) / "server.log"  # a file, not a pipe: nobody drains a pipe while the load runs
    with log_path.open("w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text(), file=sys.stderr)
                raise SystemExit("server did not start")
            time.sleep(0.2)

        results, wall = asyncio.run(run_load(url, args))
        time.sleep(0.2)
        health = httpx.get(url + "/health").json()
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)

    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    n = args.clients * args.requests
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    out_tok = sum(r["usage"]["completion_tokens"] for r in ok)
    prompt_tok = sum(r["usage"]["prompt_tokens"] for r in ok)
    hit_tok = sum(r["usage"]["prompt_cache_hit_tokens"] for r in ok)
    cost = sum(r["usage"]["cost"]["total"] for r in ok)
    left = {k: health[k] for k in ("running", "waiting", "in_flight", "kv_cache_usage")}
    clean = all(v == 0 for v in left.values())
    print(f"command: {' '.join(sys.argv)}")
    print(f"requests: {len(results)}/{n} returned, {len(errors)} errors; after the run: {left}")
    for e in errors[:5]:
        print("  error:", e)
    if ok:
        req_s, tok_s, hit = len(ok) / wall, out_tok / wall, hit_tok / max(prompt_tok, 1)
        lat50, lat95, ttft50, ttft95 = pct(lat, 50), pct(lat, 95), pct(ttft, 50), pct(ttft, 95)
        print(f"throughput: {req_s:.2f} req/s, {tok_s:.1f} generated tok/s ({out_tok} tokens in {wall:.2f} s)")
        print(f"latency: p50 {lat50:.3f} s, p95 {lat95:.3f} s; TTFT p50 {ttft50:.3f} s, p95 {ttft95:.3f} s")
        print(f"prefix cache: {hit_tok}/{prompt_tok} prompt tokens hit ({hit:.0%}); metered cost ${cost:.6f}")
        print("\n| clients × requests | max_tokens | req/s | gen tok/s | p50 latency | p95 latency | "
              "p50 TTFT | p95 TTFT | cache hit | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {args.clients} × {args.requests} | {args.max_tokens} | {req_s:.2f} | {tok_s:.1f} | "
              f"{lat50:.2f} s | {lat95:.2f} s | {ttft50:.2f} s | {ttft95:.2f} s | {hit:.0%} | {len(errors)} |")
    aborted = [ln for ln in metrics.splitlines() if ln.startswith("nanoseek_aborted_requests_total ")]
    if aborted:
        print("server:", aborted[0])
    if errors or len(results) != n or not clean:
        print("FAILED: errors, missing results, or requests/cache left behind", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
