"""`nanoseek serve`: an OpenAI/DeepSeek-compatible HTTP API (and the web chat page) on the engine.

What a client of api.deepseek.com expects is the contract (docs/deepseek.md, the API): the same routes, the
same request fields, ``reasoning_content`` beside ``content``, usage with prompt-cache hits and
misses, OpenAI-shaped errors, ``: keep-alive`` comments while a stream waits. Point the official
``openai`` client at ``http://127.0.0.1:8000/v1`` and it works unchanged.

How a request flows: pydantic validates the body (bad JSON → 400, bad values → 422) → the chat
template turns messages into ids (``<think>\\n`` pre-opened for reasoner models) → admission
control (a bounded number in flight, past it 429 with ``Retry-After``) → ``AsyncEngine`` streams
``StreamEvent``s → :class:`ThinkSplitter` routes text to ``reasoning_content`` or ``content`` →
usage and cost are computed from the engine's counts (``cached_tokens`` = prefix-cache hits).

A client that goes away cancels its generation: Starlette cancels the streaming body when the
socket closes, non-streaming requests poll for the disconnect, and closing the engine stream
aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..cost import API_PRICES
from ..engine.speculative import SPECULATIVE_TOKENS_HELP, check_speculative_tokens
from .metrics import ServeMetrics
from .protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChoiceLogprobs, CompletionChoice, CompletionRequest,
                       CompletionResponse, CompletionTokensDetails, Cost, DeltaMessage, DeltaToolCall, ErrorBody,
                       DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard, ModelList,
                       PromptTokensDetails, ResponseMessage, ResponseToolCall, TokenizeRequest, TokenizeResponse,
                       TokenLogprob, TopLogprob, Usage, new_id)
from .reasoning import CONTENT, REASONING, ThinkSplitter, count_reasoning_tokens
from .structured import response_format_grammar, tool_call_grammar
from .tools import ToolCallParser

log = logging.getLogger("nanoseek.serve")
UI_DIR = Path(__file__).parent / "ui"


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class ServeConfig:
    """`nanoseek serve`: the HTTP API and web chat page for one checkpoint."""

    ckpt: str = field(metadata={"help": "checkpoint directory (config.json, model.safetensors, tokenizer.json), "
                                        "or any stage's run directory (its model/)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes it to the network)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: list[str] = field(default_factory=list, metadata={
        "repeatable": True,
        "help": "an accepted Bearer token (repeat the flag for more); none = no auth. Also read from "
                "$NANOSEEK_API_KEYS (comma-separated), which keeps keys out of `ps`"})
    auth_metrics_docs: bool = field(default=False, metadata={
        "help": "also require the API key for /metrics and the OpenAPI pages (/docs, /redoc, /openapi.json)"})
    model_name: str = field(default="nanoseek", metadata={"help": "model id clients send and /v1/models lists"})
    think: bool = field(default=False, metadata={
        "help": "pre-open <think> in the generation prompt for `model_name` (the reasoner template); "
                "the aliases deepseek-chat / deepseek-reasoner always mean off / on"})
    # defaults: deepseek-reasoner's list prices (nanoseek.cost.API_PRICES, with their date)
    price_cache_hit: float = field(default=API_PRICES["deepseek-reasoner"][0], metadata={
        "help": "USD per 1M prompt tokens served from cache"})
    price_cache_miss: float = field(default=API_PRICES["deepseek-reasoner"][1], metadata={
        "help": "USD per 1M prompt tokens computed"})
    price_output: float = field(default=API_PRICES["deepseek-reasoner"][2], metadata={
        "help": "USD per 1M completion tokens (reasoning included)"})
    max_queue: int = field(default=256, metadata={
        "help": "requests allowed to wait beyond max_num_seqs; past it 429 with Retry-After"})
    max_tokens_limit: int | None = field(default=None, metadata={
        "help": "upper bound on max_tokens per request (default: the rest of the context)"})
    max_body_bytes: int = field(default=4 * 2**20, metadata={
        "help": "largest request body accepted; a larger one is a 413 before it is parsed"})
    keepalive_s: float = field(default=5.0, metadata={"help": "seconds between SSE ': keep-alive' comments"})
    max_num_seqs: int = field(default=64, metadata={"help": "engine: sequences decoded together"})
    max_batch_tokens: int = field(default=2048, metadata={"help": "engine: tokens per step (prefill chunking)"})
    block_size: int = field(default=16, metadata={"help": "engine: KV-cache block (prefix-cache unit) in tokens"})
    cache_tokens: int | None = field(default=None, metadata={"help": "engine: KV-cache capacity in tokens"})
    enable_prefix_cache: bool = field(default=True, metadata={"help": "engine: reuse cached prompt prefixes"})
    speculative_tokens: int = field(default=0, metadata={"help": "engine: " + SPECULATIVE_TOKENS_HELP})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: best available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32 / bfloat16 / float16"})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level", "choices": LOG_LEVELS})

    def __post_init__(self) -> None:
        """Bad values fail here, as one line naming the flag, not as a traceback from uvicorn or the engine."""
        from nanoseek.checkpoint import ckpt_flag
        from nanoseek.engine.engine import check_device

        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port}: must be in [0, 65535]")
        for name in ("max_num_seqs", "max_batch_tokens", "block_size", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be ≥ 1")
        for name in ("cache_tokens", "max_tokens_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be ≥ 1")
        check_speculative_tokens(self.speculative_tokens)
        if self.max_queue < 0:
            raise ValueError(f"--max-queue {self.max_queue}: must be ≥ 0")
        if not (math.isfinite(self.keepalive_s) and self.keepalive_s > 0):
            raise ValueError(f"--keepalive-s {self.keepalive_s}: must be a finite number of seconds > 0")
        for name in ("price_cache_hit", "price_cache_miss", "price_output"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"--{name.replace('_', '-')} {v}: must be a finite price ≥ 0")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level {self.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        ckpt_flag(self.ckpt)  # a file, a missing or empty directory, a run without model/
        check_device(self.device)
        for k in self.api_key:
            _check_key(k, "--api-key")
        self.keys()  # $NANOSEEK_API_KEYS too: a bad key refuses to start, never turns auth off

    def keys(self) -> list[str]:
        env = os.environ.get("NANOSEEK_API_KEYS")
        from_env = [] if env is None else env.split(",")
        for k in from_env:
            _check_key(k, "$NANOSEEK_API_KEYS")
        return list(self.api_key) + from_env


def _check_key(key: str, where: str) -> None:
    """An empty key (an unset ``$KEY`` on the command line, a trailing comma) must stop the server
    from starting: taken as "no key" it would silently serve everyone."""
    if not key or not key.strip():
        raise ValueError(f"{where}: an API key is empty (an unset variable?); give a non-empty key or none at all")
    if key != key.strip() or not key.isascii() or not key.isprintable() or " " in key:
        raise ValueError(f"{where}: an API key must be printable ASCII without spaces "
                         "(it travels in an 'Authorization: Bearer' header)")


# ------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error the client should see, in OpenAI's shape, with DeepSeek's status codes."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_balance",
             404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "overloaded_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        # a lone surrogate echoed from the request would make the JSON body unencodable (a 500)
        message, param = _printable(message), (None if param is None else _printable(param))
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.TYPES.get(self.status, "error"),
                                             param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def _printable(s: str) -> str:
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _bad_unicode(obj: Any, path: str = "") -> str | None:
    """The path (``messages[0].content``) of the first string, or dict key, that is not valid
    Unicode — JSON may carry lone surrogates (``"\\ud800"``), which no tokenizer can encode."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _bad_unicode(k) is not None:
                return where
            if (bad := _bad_unicode(v, where)) is not None:
                return bad
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            if (bad := _bad_unicode(v, f"{path}[{i}]")) is not None:
                return bad
    return None


def check_unicode(req) -> None:
    """Every string of the request is valid Unicode, or a 400 naming the field."""
    bad = _bad_unicode(req.model_dump(exclude_none=True))
    if bad is not None:
        raise APIError(400, f"{bad} is not valid Unicode (it holds a lone UTF-16 surrogate)", "invalid_unicode",
                       param=bad)


def check_supported(req) -> None:
    """A field this server does not implement, and whose effect a client would miss unseen, is a 400."""
    bad = req.unsupported()
    if bad is not None:
        raise APIError(400, f"{bad} is not supported by this server (docs/serving.md lists the fields it takes)",
                       "unsupported_parameter", param=bad)


def _validation_error(exc: RequestValidationError) -> APIError:
    """Malformed JSON or a body that is not an object → 400; a field with a bad value → 422."""
    errors = exc.errors()
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if e.get("type") == "json_invalid":
            why = (e.get("ctx") or {}).get("error", e.get("msg"))
            return APIError(400, f"request body is not valid JSON: {why}", "invalid_json")
        if loc == ("body",):
            raw = e.get("input")
            if isinstance(raw, (bytes, str)):  # FastAPI parses JSON only with a JSON content type
                try:
                    json.loads(raw)
                    msg = "send the body with 'Content-Type: application/json'"
                except ValueError as err:
                    return APIError(400, f"request body is not valid JSON: {err}", "invalid_json")
            else:
                msg = "request body must be a JSON object with the request fields"
            return APIError(400, msg, "invalid_body")
    missing = [".".join(str(p) for p in e["loc"][1:]) for e in errors if e.get("type") == "missing"]
    if missing:
        return APIError(400, f"request body lacks required field(s): {', '.join(missing)}", "invalid_body",
                        param=missing[0])
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
    detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                       for e in errors[:5])
    return APIError(422, f"invalid parameters: {detail}", "invalid_parameter", param=where)


# ------------------------------------------------------------------------------------ the app
class _StatusRecorder:
    """Pure ASGI middleware counting responses by route and status (BaseHTTPMiddleware would
    buffer streaming bodies and hide client disconnects from the streaming response)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            known = ("/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
                     "/v1/models", "/models", "/tokenize", "/detokenize", "/health", "/metrics", "/")
            if path.startswith(("/v1/models/", "/models/")):
                path = path[:path.rindex("/")] + "/{id}"
            else:
                path = path if path in known else "other"
            self.metrics.requests.inc(endpoint=path, status=str(status["code"]))


PROTECTED = ("/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


class _Guard:
    """Pure ASGI middleware in front of every route: a body larger than ``max_body_bytes`` is a
    413 before anything parses it (a 10 MB message must not reach JSON parsing or the tokenizer),
    and with ``auth_metrics_docs`` the info pages need the key too.

    A too-large body is read and dropped (up to a cap) before the 413 goes out, so a client still
    writing its body reads the 413 instead of a reset connection."""

    DRAIN_CAP = 64 * 2**20

    def __init__(self, app, srv: "_Server"):
        self.app, self.srv = app, srv

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        srv = self.srv
        if srv.cfg.auth_metrics_docs and scope.get("path") in PROTECTED:
            headers = dict(scope.get("headers") or [])
            if not srv.authorized(headers.get(b"authorization", b"").decode("latin-1")):
                return await _send_error(send, srv.auth_error())
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = srv.cfg.max_body_bytes
        chunks, size, more = [], 0, True
        while more and size <= self.DRAIN_CAP:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size <= limit:
                chunks.append(body)
            more = msg.get("more_body", False)
        if size > limit:
            return await _send_error(send, APIError(
                413, f"request body is larger than this server's limit of {limit} bytes", "request_too_large"))
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


async def _send_error(send, err: "APIError") -> None:
    resp = err.response()
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()]
    await send({"type": "http.response.start", "status": resp.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": resp.body})


_SECRET_QUERY = re.compile(r"([?&;][^=&;\s]*(?:key|token|secret|auth|pass)[^=&;\s]*=)[^&;\s\"]*", re.I)


class _RedactSecrets(logging.Filter):
    """uvicorn's access log writes the full path, query string included: a key sent as
    ``?api_key=…`` (or any accepted key anywhere in a line) is written as ``***``."""

    def __init__(self, keys: list[str]):
        super().__init__()
        self.keys = sorted({v for k in keys for v in (k, quote(k, safe=""))}, key=len, reverse=True)

    def clean(self, s: str) -> str:
        s = _SECRET_QUERY.sub(r"\1***", s)
        for k in self.keys:
            s = s.replace(k, "***")
        return s

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.clean(a) if isinstance(a, str) else a for a in record.args)
        return True


class _Admission:
    """One accepted request's place in ``in_flight``, held from acceptance (before tokenization)
    until its response is done; ``release`` is idempotent, so every exit path may call it."""

    def __init__(self, srv: "_Server"):
        self.srv, self.held, self.handed_over = srv, True, False
        srv.in_flight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.srv.in_flight -= 1


class _Server:
    """State shared by the route handlers: engine, tokenizer, config, metrics, admission counter."""

    def __init__(self, engine, cfg: ServeConfig):
        if engine.tokenizer is None:
            raise ValueError("the engine has no tokenizer: the server renders chats and decodes text with it")
        self.engine, self.cfg = engine, cfg
        self.tok = engine.tokenizer
        self.aengine = None  # AsyncEngine, created inside the running event loop (lifespan)
        self.in_flight = 0
        self.closing = False
        self.keys = [k.encode() for k in cfg.keys()]
        self.models = {cfg.model_name: cfg.think, "deepseek-chat": False, "deepseek-reasoner": True}
        self.created = int(time.time())
        self.metrics = ServeMetrics(queue_depth=lambda: self.queue_depth(), running=lambda: engine.num_running,
                                    in_flight=lambda: self.in_flight, cache_usage=lambda: self.cache_usage(),
                                    engine_stats=(lambda: engine.stats) if engine.speculative_tokens else None)

    # -------------------------------------------------------------- engine state
    def queue_depth(self) -> int:
        return self.aengine.queue_depth if self.aengine is not None else self.engine.num_waiting

    def cache_usage(self) -> float:
        """Fraction of KV blocks held by live requests (prefix-cached free blocks do not count)."""
        return float(self.engine.cache_usage)

    # -------------------------------------------------------------- request pieces
    def authorized(self, header: str) -> bool:
        if not self.keys:
            return True
        scheme, _, token = header.partition(" ")
        token = token.strip().encode("utf-8", "replace")
        # compare_digest against every key: no early exit that would time-leak a key's prefix
        hits = [hmac.compare_digest(token, k) for k in self.keys]
        return scheme.lower() == "bearer" and any(hits)

    @staticmethod
    def auth_error() -> APIError:
        return APIError(401, "invalid API key: send it as 'Authorization: Bearer <key>'", "invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})

    def check_auth(self, request: Request) -> None:
        if not self.authorized(request.headers.get("authorization", "")):
            raise self.auth_error()

    def check_model(self, name: str) -> bool:
        """The model id → whether its template pre-opens <think>."""
        if name not in self.models:
            raise APIError(400, f"model {name!r} does not exist; this server serves {sorted(self.models)}",
                           "model_not_found", param="model")
        return self.models[name]

    def render_chat(self, req, think_default: bool, add_generation_prompt: bool = True) -> tuple[list[int], bool]:
        """Messages (of a chat or a /tokenize request) → prompt ids, and whether the generation
        starts inside <think>."""
        msgs: list[dict] = []
        for i, m in enumerate(req.messages):
            if m.reasoning_content is not None:
                raise APIError(400, f"messages[{i}].reasoning_content must not be sent back: drop the previous "
                               "turn's reasoning_content and keep only its content", "invalid_request_error",
                               param=f"messages[{i}].reasoning_content")
            if m.prefix and (i != len(req.messages) - 1 or m.role != "assistant"):
                raise APIError(400, "prefix: true is only allowed on the last message, which must be the "
                               "assistant's", "invalid_request_error", param=f"messages[{i}].prefix")
            msg = {"role": m.role, "content": m.text()}
            if m.role == "assistant" and m.tool_calls:
                msg["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
            msgs.append(msg)
        tools = self.shown_tools(req)
        if (tools or any(m.role == "tool" or m.tool_calls for m in req.messages)) and self.tok.tool_ids is None:
            raise APIError(400, "this checkpoint's tokenizer has no tool-call tokens: tools, tool calls and role "
                           "\"tool\" messages need a tokenizer trained with them", "invalid_request_error",
                           param="tools")
        think = think_default if req.think() is None else req.think()
        if req.messages[-1].prefix:  # chat prefix completion: continue the assistant's text as it is
            ids = self.tok.render_chat(msgs[:-1], add_generation_prompt=True, tools=tools)[0]
            return ids + self.tok.encode(msgs[-1]["content"], allow_special=False), False
        if not add_generation_prompt:
            return self.tok.render_chat(msgs, add_generation_prompt=False, tools=tools)[0], False
        return self.tok.render_chat(msgs, add_generation_prompt=True, think=think, tools=tools)[0], think

    @staticmethod
    def shown_tools(req) -> list[dict] | None:
        """The tools the template lists: all of them, unless tool_choice is "none"."""
        if not req.tools or req.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in req.tools]

    def tool_parser(self, req) -> ToolCallParser | None:
        """A reader of the reply's tool calls, when the template showed tools (``parallel_tool_calls``
        false: the first call only)."""
        if not self.shown_tools(req):
            return None
        return ToolCallParser(1 if req.parallel_tool_calls is False else None)

    @staticmethod
    def forced_tools(req) -> list | None:
        """The tools one of which the reply must call (tool_choice "required" or a named function),
        or None; a tool_choice that names no given tool is a 400."""
        choice = req.tool_choice
        if choice is not None and choice != "none" and not req.tools:
            raise APIError(400, "tool_choice needs tools", "invalid_request_error", param="tool_choice")
        if choice == "required":
            return list(req.tools)
        if choice is not None and not isinstance(choice, str):
            named = [t for t in req.tools if t.function.name == choice.function.name]
            if not named:
                raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not in tools",
                               "invalid_request_error", param="tool_choice")
            return named[:1]
        return None

    def constraint(self, req, in_think: bool):
        """The grammar the reply must follow (a forced tool call, or response_format), or None."""
        forced = self.forced_tools(req)
        fmt = req.response_format if req.response_format is not None and req.response_format.type != "text" else None
        if forced is None and fmt is None:
            return None
        if forced is not None and fmt is not None:
            raise APIError(400, "response_format cannot be combined with a forced tool call (tool_choice required "
                           "or a named function)", "invalid_request_error", param="response_format")
        if req.messages[-1].prefix:
            raise APIError(400, "prefix: true cannot be combined with response_format or a forced tool call",
                           "invalid_request_error", param="messages")
        param = "tools" if forced is not None else "response_format"
        try:
            if forced is not None:
                return tool_call_grammar(self.engine, forced, in_think)
            return response_format_grammar(self.engine, fmt, in_think)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", "invalid_request_error", param=param) from None

    def check_token_ids(self, ids: list[int], param: str, status: int) -> None:
        bad = [t for t in ids if not 0 <= t < self.tok.vocab_size]
        if bad:
            raise APIError(status, f"{param}: token ids out of range [0, {self.tok.vocab_size}): {bad[:5]}",
                           "invalid_parameter", param=param)

    def sampling_params(self, req, prompt_len: int, logprobs: bool, top_logprobs: int):
        from nanoseek.engine import SamplingParams

        room = self.engine.max_context - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_len} tokens but this model's context is "
                           f"{self.engine.max_context} tokens: shorten the messages", "context_length_exceeded",
                           param="messages")
        capacity = self.engine.num_blocks * self.engine.block_size
        if prompt_len + 1 > capacity:
            raise APIError(400, f"the prompt is {prompt_len} tokens but this server's KV cache holds "
                           f"{capacity} tokens (--cache-tokens): shorten the messages", "context_length_exceeded",
                           param="messages")
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or room
        max_tokens = min(max_tokens, room, self.cfg.max_tokens_limit or room)
        try:  # a vanishing temperature or top_p is greedy decoding: the sampler itself handles both
            return SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                repetition_penalty=req.repetition_penalty, seed=req.seed, stop=list(req.stop or []),
                logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=req.ignore_eos,
                token_healing=req.token_healing)
        except ValueError as e:  # the engine's own checks, should a bound here ever drift from them
            raise APIError(422, str(e), "invalid_parameter") from None

    def admit(self) -> _Admission:
        """Accept a request (it counts in ``in_flight`` from now on) or refuse it: past
        ``max_num_seqs + max_queue``, 429 with ``Retry-After``."""
        if self.closing or self.aengine is None:
            raise APIError(503, "the server is shutting down", "server_unavailable", headers={"Retry-After": "5"})
        if self.in_flight >= self.cfg.max_num_seqs + self.cfg.max_queue:
            raise APIError(429, f"too many requests in flight ({self.in_flight}); retry shortly",
                           "rate_limit_exceeded", headers={"Retry-After": "1"})
        return _Admission(self)

    def usage(self, prompt: int, hit: int, completion: int, reasoning: int) -> Usage:
        c = self.cfg
        cost_hit, cost_miss = hit * c.price_cache_hit / 1e6, (prompt - hit) * c.price_cache_miss / 1e6
        cost_out = completion * c.price_output / 1e6
        cost = Cost(prompt_cache_hit=round(cost_hit, 12), prompt_cache_miss=round(cost_miss, 12),
                    completion=round(cost_out, 12), total=round(cost_hit + cost_miss + cost_out, 12))
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_cache_hit_tokens=hit, prompt_cache_miss_tokens=prompt - hit,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=hit),
                     completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning), cost=cost)

    def logprobs(self, ev) -> list[TokenLogprob]:
        """The engine's per-token logprobs → OpenAI's ``logprobs.content`` entries."""
        return [TokenLogprob(**self._tok_entry(x.token_id, x.logprob),
                             top_logprobs=[TopLogprob(**self._tok_entry(t, v)) for t, v in x.top_logprobs.items()])
                for x in ev.logprobs or []]

    def _tok_entry(self, tid: int, logprob) -> dict:
        text = self.tok.decode([int(tid)])  # once per token: this runs per generated token
        return {"token": text, "logprob": float(logprob), "bytes": list(text.encode())}

    # -------------------------------------------------------------- generation
    async def events(self, prompt_ids, params, request_id: str):
        """One request's StreamEvents, engine errors mapped to API errors. Closing it early (a
        cancelled task, a client gone) aborts the request and frees its KV blocks."""
        from nanoseek.engine.engine import PromptTooLongError, RequestFailedError

        it = self.aengine.generate_stream(prompt_ids, params, request_id=request_id)
        try:
            async for ev in it:
                yield ev
                if ev.finished:
                    return
        except PromptTooLongError as e:  # the engine's own bound, should the check above drift
            raise APIError(400, str(e), "context_length_exceeded", param="messages") from None
        except RequestFailedError as e:  # this request alone failed; the engine serves on
            log.error("%s", e)
            raise APIError(500, str(e), "internal_error") from None
        finally:
            with suppress(Exception):
                await it.aclose()  # unfinished: the engine aborts the request

    def finish_metrics(self, usage: Usage | None, t0: float, t_first: float | None, aborted: bool) -> None:
        m = self.metrics
        if usage is not None:
            m.record_usage(usage.prompt_tokens, usage.prompt_cache_hit_tokens, usage.completion_tokens,
                           usage.completion_tokens_details.reasoning_tokens, usage.cost)
        if aborted:
            m.aborted.inc()
            return
        m.latency.observe(time.perf_counter() - t0)
        if t_first is not None:
            m.ttft.observe(t_first - t0)


def create_app(engine, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app for one engine; ``engine`` is an ``nanoseek.engine.Engine``."""
    srv = _Server(engine, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from nanoseek.engine import AsyncEngine

        srv.aengine = AsyncEngine(engine)
        redact = _RedactSecrets(cfg.keys())  # added here: uvicorn configures its loggers before startup
        loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error")]
        for lg in loggers:
            lg.addFilter(redact)
        try:
            yield
        finally:
            srv.closing = True
            srv.aengine.shutdown()
            for lg in loggers:
                lg.removeFilter(redact)

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan,
                  description="OpenAI/DeepSeek-compatible API for a nanoseek checkpoint")
    app.state.server = srv
    app.add_middleware(_Guard, srv=srv)
    app.add_middleware(_StatusRecorder, metrics=srv.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else None)
        err.headers = dict(exc.headers or {})
        return err.response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}", "internal_error").response()

    auth = [Depends(srv.check_auth)]

    # ---------------------------------------------------------------- info routes
    @app.get("/health")
    async def health():
        return {"status": "ok" if srv.aengine is not None and not srv.closing else "starting",
                "model": cfg.model_name, "max_context": engine.max_context, "in_flight": srv.in_flight,
                "queue_depth": srv.queue_depth(), "running": engine.num_running,
                "waiting": engine.num_waiting, "kv_cache_usage": srv.cache_usage()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(srv.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=auth, response_model=ModelList)
    @app.get("/models", dependencies=auth, response_model=ModelList, include_in_schema=False)
    async def models():
        return ModelList(data=[ModelCard(id=name, created=srv.created, max_model_len=engine.max_context)
                               for name in srv.models])

    @app.get("/v1/models/{model_id}", dependencies=auth, response_model=ModelCard,
             responses={404: {"model": ErrorResponse}})
    @app.get("/models/{model_id}", dependencies=auth, response_model=ModelCard, include_in_schema=False)
    async def model(model_id: str):
        if model_id not in srv.models:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {sorted(srv.models)}",
                           "model_not_found", param="model")
        return ModelCard(id=model_id, created=srv.created, max_model_len=engine.max_context)

    # ---------------------------------------------------------------- chat
    @app.post("/v1/chat/completions", dependencies=auth, response_model=ChatCompletionResponse,
              responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}})
    @app.post("/chat/completions", dependencies=auth, include_in_schema=False)
    async def chat(req: ChatCompletionRequest, request: Request):
        check_unicode(req)
        check_supported(req)
        think = srv.check_model(req.model)
        ticket = srv.admit()
        try:
            # off the event loop: a long prompt's tokenization must not stall /health or other streams
            prompt_ids, in_think = await asyncio.to_thread(srv.render_chat, req, think)
            constraint = await asyncio.to_thread(srv.constraint, req, in_think)
            top = req.top_logprobs or 0
            jobs = _jobs(srv, req, [prompt_ids], req.logprobs or top > 0, top, constraint)
            rid = new_id("chatcmpl")
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return _sse(_chat_stream(srv, req, rid, jobs, in_think, include_usage), ticket)
            return await _until_disconnect(request, _chat_full(srv, req, rid, jobs, in_think))
        finally:
            if not ticket.handed_over:  # a streamed response releases it when the stream ends
                ticket.release()

    # ---------------------------------------------------------------- completions
    @app.post("/v1/completions", dependencies=auth, response_model=CompletionResponse,
              responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                         422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}})
    @app.post("/completions", dependencies=auth, include_in_schema=False)
    async def completions(req: CompletionRequest, request: Request):
        check_unicode(req)
        check_supported(req)
        srv.check_model(req.model)
        if req.suffix is not None:  # fill-in-the-middle: each prompt is the prefix
            if srv.tok.fim_ids is None:
                raise APIError(400, "suffix (fill-in-the-middle) needs a model trained with FIM tokens; this "
                               "checkpoint's tokenizer has none", "invalid_request_error", param="suffix")
            if req.echo or not all(isinstance(p, str) for p in req.prompts()):
                raise APIError(400, "suffix takes the prompt as text (a string or a list of strings) and no echo",
                               "invalid_request_error", param="suffix")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(422, "max_tokens 0 is only allowed with echo: true (it scores the prompt without "
                           "generating); otherwise max_tokens must be ≥ 1", "invalid_parameter", param="max_tokens")
        if req.stream and req.echo and (req.logprobs is not None or req.max_tokens == 0):
            raise APIError(400, "echo with logprobs or with max_tokens 0 (prompt scoring) is not supported when "
                           "streaming: send it with stream: false", "invalid_request_error", param="stream")
        prompts = req.prompts()
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                srv.check_token_ids(p, "prompt" if isinstance(req.prompt[0], int) else f"prompt[{i}]", 422)
        ticket = srv.admit()
        try:
            texts = [p for p in prompts if isinstance(p, str)]
            if req.suffix is not None:
                encoded = iter([await asyncio.to_thread(srv.tok.fim_prompt, p, req.suffix, add_bos=True)
                                for p in texts])
            else:
                encoded = iter(await asyncio.to_thread(srv.tok.encode_batch, texts, True, False) if texts else [])
            prompt_ids = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
            top = req.logprobs or 0
            jobs = _jobs(srv, req, prompt_ids, req.logprobs is not None, top)
            rid = new_id("cmpl")
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return _sse(_completion_stream(srv, req, rid, jobs, include_usage), ticket)
            return await _until_disconnect(request, _completion_full(srv, req, rid, jobs))
        finally:
            if not ticket.handed_over:  # a streamed response releases it when the stream ends
                ticket.release()

    # ---------------------------------------------------------------- vLLM's token counting
    @app.post("/tokenize", dependencies=auth, response_model=TokenizeResponse,
              responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}})
    async def tokenize(req: TokenizeRequest):
        check_unicode(req)
        think = srv.check_model(req.model if req.model is not None else cfg.model_name)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of prompt (a string) and messages", "invalid_body",
                           param="prompt" if req.prompt is None else "messages")
        if req.prompt is not None:
            ids = await asyncio.to_thread(srv.tok.encode, req.prompt, req.add_special_tokens, False)
        else:
            ids = (await asyncio.to_thread(srv.render_chat, req, think, req.add_generation_prompt))[0]
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_context)

    @app.post("/detokenize", dependencies=auth, response_model=DetokenizeResponse,
              responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}})
    async def detokenize(req: DetokenizeRequest):
        if req.model is not None:
            srv.check_model(req.model)
        srv.check_token_ids(req.tokens, "tokens", 400)
        return DetokenizeResponse(prompt=srv.tok.decode(req.tokens))

    # ---------------------------------------------------------------- the web page
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")
    return app


# ------------------------------------------------------------------------------ generation bodies
class _AdmittedStream(StreamingResponse):
    """A streamed body that holds its request's admission until the response is over — also when
    the client left before the body began, and the generator (whose ``finally`` would) never ran."""

    def __init__(self, gen, ticket: _Admission):
        super().__init__(gen, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ticket = ticket
        ticket.handed_over = True

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with suppress(Exception):
                await self.body_iterator.aclose()
            self.ticket.release()


def _sse(gen, ticket: _Admission) -> StreamingResponse:
    return _AdmittedStream(gen, ticket)


def _data(obj) -> str:
    payload = obj if isinstance(obj, str) else obj.model_dump_json(exclude_none=True)
    return f"data: {payload}\n\n"


async def _until_disconnect(request: Request, coro):
    """Run a non-streaming generation, cancelling it (and so freeing its cache) if the client leaves."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with suppress(BaseException):
                    await task
                return PlainTextResponse("", status_code=499)  # nobody reads it; nginx's "client closed"
    finally:
        if not task.done():
            task.cancel()
            with suppress(BaseException):
                await task


MAX_CHOICES = 64  # prompts × n in one request: each is a sequence in the engine


@dataclass
class _Job:
    """One choice to generate: which of the request's prompts it continues, its ids, its sampling."""

    prompt: int
    ids: list[int]
    params: Any


def _jobs(srv: "_Server", req, prompts: list[list[int]], logprobs: bool, top: int, constraint=None) -> list[_Job]:
    """``n`` choices per prompt, in OpenAI's order (choice ``index`` = prompt × n + j); with a seed,
    choice k samples with seed + k, so each choice has its own stream and the request repeats.
    The copies go to the engine together, which computes their shared prefill once; a
    ``constraint`` (a grammar) gives each choice its own matcher."""
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompt(s) × n={req.n} is more than {MAX_CHOICES} choices in one "
                       "request: send fewer prompts or a smaller n", "invalid_request_error", param="n")
    jobs = []
    for p, ids in enumerate(prompts):
        params = srv.sampling_params(req, len(ids), logprobs, top)
        for _ in range(req.n):
            seed = None if req.seed is None else (req.seed + len(jobs) + 2**63) % 2**64 - 2**63
            jobs.append(_Job(p, ids, replace(params, seed=seed, constraint=constraint)))
    return jobs


class _Run:
    """One request's generations and their accounting, shared by the four response bodies: it
    holds a place in ``in_flight`` while open and keeps what each choice has generated current,
    so that closing it — also from the ``finally`` of a request cancelled mid-way (client gone) —
    meters what it used."""

    def __init__(self, srv: _Server, in_think: bool, jobs: list[_Job], rid: str):
        self.srv, self.in_think, self.jobs, self.rid = srv, in_think, jobs, rid
        self.t0, self.t_first = time.perf_counter(), None
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.evs: list[Any] = [None for _ in jobs]
        self.t_last: list[float | None] = [None for _ in jobs]  # each choice's latest tokens
        self._usage: Usage | None = None

    def __enter__(self) -> "_Run":
        return self

    def __exit__(self, *exc) -> None:
        started = any(ev is not None for ev in self.evs)
        done = all(ev is not None and ev.finished for ev in self.evs)
        self.srv.finish_metrics(self.usage() if started else None, self.t0, self.t_first, aborted=not done)

    def add(self, k: int, ev) -> bool:
        """Record choice k's engine event; True when it carries the request's first generated token.
        The time since the choice's previous tokens, spread over this event's, is each one's
        inter-token latency."""
        now = time.perf_counter()
        first = self.t_first is None and bool(ev.token_ids)
        if first:
            self.t_first = now
        if ev.token_ids:
            if self.t_last[k] is not None:
                for _ in ev.token_ids:
                    self.srv.metrics.itl.observe((now - self.t_last[k]) / len(ev.token_ids))
            self.t_last[k] = now
        self.ids[k] += list(ev.token_ids)
        self.evs[k] = ev
        return first

    def usage(self) -> Usage:
        """Each prompt counted once (as its first choice's prefill found the cache), every choice's
        completion tokens added."""
        if self._usage is None:
            prompt = hit = completion = reasoning = 0
            seen: set[int] = set()
            tok = self.srv.tok
            for job, ev, ids in zip(self.jobs, self.evs, self.ids):
                if ev is None:
                    continue
                if job.prompt not in seen:
                    seen.add(job.prompt)
                    prompt, hit = prompt + int(ev.num_prompt_tokens), hit + int(ev.cached_tokens)
                completion += int(ev.num_completion_tokens)
                reasoning += count_reasoning_tokens(ids, tok.end_think_id, tok.think_id, self.in_think)
            self._usage = self.srv.usage(prompt, hit, completion, reasoning)
        return self._usage

    async def stream(self, keepalive: bool):
        """Every choice's events as they come, as ``(k, event)``, interleaved; None every
        ``keepalive_s`` while none arrives. Leaving early aborts every choice still generating."""
        queue: asyncio.Queue = asyncio.Queue()
        one = len(self.jobs) == 1

        async def pump(k: int, job: _Job):
            try:
                async for ev in self.srv.events(job.ids, job.params, self.rid if one else f"{self.rid}-{k}"):
                    queue.put_nowait((k, ev, None))
            except Exception as e:
                queue.put_nowait((k, None, e))
                return
            queue.put_nowait((k, None, None))

        tasks = [asyncio.ensure_future(pump(k, job)) for k, job in enumerate(self.jobs)]
        get = None
        try:
            left = len(tasks)
            while left:
                if get is None:
                    get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get}, timeout=self.srv.cfg.keepalive_s if keepalive else None)
                if not done:
                    yield None
                    continue
                (k, ev, err), get = get.result(), None
                if err is not None:
                    raise err
                if ev is None:
                    left -= 1
                    continue
                yield k, ev
        finally:
            pending = [t for t in (*tasks, get) if t is not None and not t.done()]
            for t in pending:
                t.cancel()  # a pump's cancelled events() closes its engine stream: the request is aborted
            await asyncio.gather(*pending, return_exceptions=True)

    async def collect(self) -> tuple[list[str], list[list[TokenLogprob]]]:
        """Run a non-streamed request to its end: each choice's text and (if asked) logprobs."""
        texts: list[list[str]] = [[] for _ in self.jobs]
        lps: list[list[TokenLogprob]] = [[] for _ in self.jobs]
        async for k, ev in self.stream(keepalive=False):
            self.add(k, ev)
            texts[k].append(ev.text_delta)
            if self.jobs[k].params.logprobs:
                lps[k] += self.srv.logprobs(ev)
        if any(ev is None for ev in self.evs):
            raise APIError(500, "the engine returned no output", "internal_error")
        return ["".join(t) for t in texts], lps


def _finish_reason(engine_reason: str | None, calls: list) -> str | None:
    """OpenAI's "tool_calls" when a reply that ended by itself called tools."""
    return "tool_calls" if calls and engine_reason == "stop" else engine_reason


async def _chat_full(srv: _Server, req, rid, jobs, in_think):
    with _Run(srv, in_think, jobs, rid) as run:
        texts, lps = await run.collect()
        choices = []
        for k, text in enumerate(texts):
            splitter = ThinkSplitter(in_think)
            pieces = splitter.feed(text) + splitter.flush()
            reasoning = "".join(t for kind, t in pieces if kind == REASONING)
            content = "".join(t for kind, t in pieces if kind == CONTENT)
            calls = []
            if (parser := srv.tool_parser(req)) is not None:
                content, calls = parser.feed(content)
                content += parser.flush()
            msg = ResponseMessage(content=content if content or not calls else None,
                                  reasoning_content=reasoning if splitter.saw_think else None,
                                  tool_calls=[ResponseToolCall(**c) for c in calls] or None)
            choices.append(ChatChoice(index=k, message=msg, finish_reason=_finish_reason(run.evs[k].finish_reason, calls),
                                      logprobs=ChoiceLogprobs(content=lps[k]) if jobs[k].params.logprobs else None))
        return ChatCompletionResponse(id=rid, model=req.model, usage=run.usage(), choices=choices)


async def _chat_stream(srv: _Server, req, rid, jobs, in_think, include_usage):
    created = int(time.time())
    splitters = [ThinkSplitter(in_think) for _ in jobs]
    parsers = [srv.tool_parser(req) for _ in jobs] if srv.shown_tools(req) else None

    def chunk(k: int, delta: DeltaMessage, finish=None, lps=None):
        return _data(ChatCompletionChunk(
            id=rid, created=created, model=req.model,
            choices=[ChatChunkChoice(index=k, delta=delta, finish_reason=finish,
                                     logprobs=ChoiceLogprobs(content=lps) if lps else None)]))

    def pieces_out(k, pieces, lps=None, final=False):
        if parsers is not None:  # content → content deltas and whole tool calls
            out = []
            for kind, text in pieces:
                if kind == REASONING:
                    out.append((kind, text, []))
                    continue
                text, calls = parsers[k].feed(text)
                out.append((kind, text, calls))
            if final:
                out.append((CONTENT, parsers[k].flush(), []))
        else:
            out = [(kind, text, []) for kind, text in pieces]
        for kind, text, calls in out:
            if text or lps:
                delta = DeltaMessage(reasoning_content=text) if kind == REASONING else DeltaMessage(content=text)
                yield chunk(k, delta, lps=lps)
                lps = None
            if calls:
                first = len(parsers[k].calls) - len(calls)
                yield chunk(k, DeltaMessage(tool_calls=[DeltaToolCall(index=first + i, **c) for i, c in enumerate(calls)]))

    with _Run(srv, in_think, jobs, rid) as run:
        try:
            for k in range(len(jobs)):
                yield chunk(k, DeltaMessage(role="assistant", content=""))
            async for item in run.stream(keepalive=True):
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                k, ev = item
                if run.add(k, ev):
                    srv.metrics.queue_time.observe(run.t_first - run.t0)
                lps = srv.logprobs(ev) if jobs[k].params.logprobs else None
                for c in pieces_out(k, splitters[k].feed(ev.text_delta), lps):
                    yield c
                if ev.finished:
                    for c in pieces_out(k, splitters[k].flush(), final=True):
                        yield c
                    calls = parsers[k].calls if parsers is not None else []
                    yield chunk(k, DeltaMessage(), finish=_finish_reason(ev.finish_reason, calls))
            if include_usage:
                yield _data(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[],
                                                usage=run.usage()))
            yield _data("[DONE]")
        except Exception as e:  # after the 200 went out, an error can only travel inside the stream
            yield _stream_error(e)


def _stream_error(e: Exception) -> str:
    """An error event, then [DONE]: what a stream ends with when generation fails after the 200."""
    if not isinstance(e, APIError):
        log.exception("generation failed mid-stream")
        e = APIError(500, f"generation failed: {type(e).__name__}", "internal_error")
    return _data(json.dumps(e.body().model_dump())) + _data("[DONE]")


def _completion_logprobs(lps: list[TokenLogprob], start: int = 0, prompt: dict | None = None) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` of the completion's tokens, whose text begins at character
    ``start`` of the choice's text; with echo, after the ``prompt``'s entries."""
    tokens = [x.token for x in lps]
    offsets = [start + n for n in _starts(tokens)]
    out = {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
           "top_logprobs": [{t.token: t.logprob for t in x.top_logprobs} for x in lps], "text_offset": offsets}
    return out if prompt is None else {k: prompt[k] + v for k, v in out.items()}


def _starts(tokens: list[str]) -> list[int]:
    """Where each token's text begins in their concatenation."""
    at, out = 0, []
    for t in tokens:
        out.append(at)
        at += len(t)
    return out


def _echoes(srv: _Server, req) -> list[str]:
    """Each prompt's text as echo returns it (decoded once per prompt, not once per choice)."""
    return [p if isinstance(p, str) else srv.tok.decode(p) for p in req.prompts()]


async def _prompt_logprobs(srv: _Server, req, jobs: list[_Job]) -> dict[int, dict[str, Any]]:
    """Each prompt's own token log-probs (OpenAI's and vLLM's ``echo`` with ``logprobs``): entry i
    is log p(t_i | t_<i) from one forward of the model, the first null (nothing predicts it). A
    string prompt's text is the string itself: the ``<|bos|>`` the server put before it is listed
    but spans none of the text (its offset 0, the next token's too)."""
    out: dict[int, dict[str, Any]] = {}
    prompts = req.prompts()
    for job in jobs:
        if job.prompt in out:
            continue
        values, tops = await asyncio.to_thread(srv.aengine.score, job.ids, req.logprobs)
        tokens = [srv.tok.decode([t]) for t in job.ids]
        added = isinstance(prompts[job.prompt], str)  # encoded with a leading <|bos|>
        offsets = [0] + _starts(tokens[1:]) if added else _starts(tokens)
        out[job.prompt] = {"tokens": tokens, "token_logprobs": [None] + values, "text_offset": offsets,
                           "top_logprobs": [None] + [{srv.tok.decode([t]): v for t, v in top.items()} for top in tops]}
    return out


async def _completion_full(srv: _Server, req, rid, jobs):
    scored = await _prompt_logprobs(srv, req, jobs) if req.echo and req.logprobs is not None else {}
    if req.max_tokens == 0:  # echo only (checked): the prompt scored, nothing generated
        return _scored_only(srv, req, rid, jobs, scored)
    echoes = _echoes(srv, req) if req.echo else None
    with _Run(srv, False, jobs, rid) as run:
        texts, lps = await run.collect()
        choices = []
        for k, (job, text) in enumerate(zip(jobs, texts)):
            echo = echoes[job.prompt] if echoes else ""
            logprobs = _completion_logprobs(lps[k], len(echo), scored.get(job.prompt)) if job.params.logprobs else None
            choices.append(CompletionChoice(index=k, text=echo + text, finish_reason=run.evs[k].finish_reason,
                                            logprobs=logprobs))
        return CompletionResponse(id=rid, model=req.model, usage=run.usage(), choices=choices)


def _scored_only(srv: _Server, req, rid, jobs: list[_Job], scored: dict[int, dict]) -> CompletionResponse:
    """``max_tokens: 0`` with echo: each choice is its prompt, ``finish_reason`` "length" (the
    budget of zero tokens is spent), usage counts each prompt once and no completion tokens."""
    t0 = time.perf_counter()
    echoes = _echoes(srv, req)
    choices = [CompletionChoice(index=k, text=echoes[job.prompt], finish_reason="length",
                                logprobs=_completion_logprobs([], 0, scored[job.prompt]) if scored else None)
               for k, job in enumerate(jobs)]
    usage = srv.usage(sum(len(job.ids) for job in {j.prompt: j for j in jobs}.values()), 0, 0, 0)
    srv.finish_metrics(usage, t0, None, aborted=False)
    return CompletionResponse(id=rid, model=req.model, usage=usage, choices=choices)


async def _completion_stream(srv: _Server, req, rid, jobs, include_usage):
    created = int(time.time())

    def chunk(k, text, finish=None, usage=None, lps=None):
        choices = [] if usage is not None else [{"index": k, "text": text, "finish_reason": finish,
                                                 "logprobs": lps}]
        body = {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage.model_dump()
        return _data(json.dumps(body, ensure_ascii=False))

    at = [0 for _ in jobs]  # where each choice's next token begins in its text (text_offset)
    with _Run(srv, False, jobs, rid) as run:
        try:
            if req.echo:
                echoes = _echoes(srv, req)
                for k, job in enumerate(jobs):
                    yield chunk(k, echoes[job.prompt])
            async for item in run.stream(keepalive=True):
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                k, ev = item
                run.add(k, ev)
                lps = None
                if jobs[k].params.logprobs:  # never with echo (refused when streaming)
                    lps = _completion_logprobs(srv.logprobs(ev), at[k])
                    at[k] += sum(len(t) for t in lps["tokens"])
                if ev.text_delta or ev.finished:
                    yield chunk(k, ev.text_delta, ev.finish_reason if ev.finished else None, lps=lps)
            if include_usage:
                yield chunk(0, "", usage=run.usage())
            yield _data("[DONE]")
        except Exception as e:
            yield _stream_error(e)


# ------------------------------------------------------------------------------------ command
def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"--dtype {name!r}: expected float32, bfloat16 or float16") from None


def build_engine(cfg: ServeConfig):
    """The engine for ``cfg.ckpt``, refused before any weight is read when the directory cannot be
    served: without tokenizer.json every chat request would fail."""
    from nanoseek.engine import Engine

    from nanoseek.checkpoint import ckpt_flag

    ckpt = ckpt_flag(cfg.ckpt)  # a run directory → its model/
    if not (ckpt / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--ckpt {cfg.ckpt}: no tokenizer.json in {ckpt}; the server needs the "
                                "checkpoint's tokenizer (save it beside the weights)")
    return Engine(ckpt, device=cfg.device, dtype=_dtype(cfg.dtype), max_num_seqs=cfg.max_num_seqs,
                  max_batch_tokens=cfg.max_batch_tokens, block_size=cfg.block_size,
                  cache_tokens=cfg.cache_tokens, enable_prefix_cache=cfg.enable_prefix_cache,
                  speculative_tokens=cfg.speculative_tokens)


def serve(cfg: ServeConfig) -> None:
    """Serve a checkpoint over an OpenAI/DeepSeek-compatible HTTP API, with a web chat page at /."""
    import uvicorn

    engine = build_engine(cfg)
    app = create_app(engine, cfg)
    n_keys = len(cfg.keys())
    auth = f"{n_keys} API key(s)" if n_keys else "no API key (anyone who can reach the port can use it)"
    print(f"nanoseek serve: {cfg.ckpt} as {cfg.model_name!r} on http://{cfg.host}:{cfg.port} "
          f"(chat page at /, API at /v1, {auth})", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
