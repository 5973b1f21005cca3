"""Request and response bodies of the OpenAI/DeepSeek chat API (docs/deepseek.md, the API), as pydantic models.

Why pydantic and why these exact names: clients (the official ``openai`` package, LangChain,
curl scripts written against api.deepseek.com) send these fields and read these fields, so the
names are the contract. Validation here is what turns a bad parameter into a 422 that names
the field, instead of an exception deep in the sampler.

Bounds follow the DeepSeek/OpenAI docs: temperature in [0, 2], top_p in [0, 1], penalties in
[-2, 2], at most 16 stop sequences, top_logprobs in [0, 20], n in [1, 16]. ``thinking`` takes
DeepSeek's object and nanoseek's boolean. A few extensions (``top_k``, ``repetition_penalty``,
``ignore_eos``, ``/tokenize``'s bodies) are optional and named as vLLM names them, so the same
client code works against both; ``token_healing`` is nanoseek's own.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Lenient(BaseModel):
    # Unknown fields are ignored, not rejected: SDKs add fields (``user``, ``metadata``, …)
    # faster than any server tracks them, and OpenAI's own server ignores what it does not use.
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------ requests
class TextPart(_Lenient):
    type: Literal["text"] = "text"
    text: str


class ToolCallFunction(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; transformers' templates take an object


class ToolCall(_Lenient):
    """One call of an assistant message: what the server returned, sent back in the history."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Present only to be rejected with a 400 that says why (docs/deepseek.md, the API): a client that sends
    # back the previous turn's reasoning would otherwise silently grow every prompt.
    reasoning_content: str | None = None
    prefix: bool | None = None  # chat prefix completion (beta): last assistant message continues
    tool_call_id: str | None = None  # role "tool": the call answered (results are rendered in order)
    tool_calls: list[ToolCall] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    """OpenAI's ``response_format.json_schema``: the schema is always enforced (``strict`` or not)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object ({"name": ..., "schema": {...}})')
        return self


class Thinking(_Lenient):
    """DeepSeek's ``thinking: {"type": "enabled" | "disabled"}``; the boolean form means the same."""

    type: Literal["enabled", "disabled"]


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call exactly this function."""

    type: Literal["function"] = "function"
    function: NamedFunction


# refused when set, except for the values that change nothing
UNSUPPORTED = ("logit_bias", "functions", "function_call", "audio", "modalities", "web_search_options", "best_of")
HARMLESS = {"logit_bias": ({},), "modalities": (["text"],), "best_of": (1,)}


class _SamplingFields(_Lenient):
    """Fields shared by /chat/completions and /completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(1, ge=1, le=16)  # choices per prompt; bounded, as each is a sequence in the engine
    user: str | None = None
    # nanoseek / vLLM extensions
    top_k: int = Field(0, ge=0, le=1_000_000)  # 0 = off
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)  # logits are divided by it: keep it finite
    ignore_eos: bool = False
    # nanoseek: back up the prompt's last token and let the first generated token(s) spell it
    # (a prompt that ends mid-token, e.g. in indentation); the reply's text starts after the prompt
    token_healing: bool = False
    # OpenAI fields nanoseek does not implement and must not ignore (ignoring would change the
    # answer unseen): present only so that a request using them is a 400 naming the field
    logit_bias: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """The first field set that this server refuses, or None."""
        for name in UNSUPPORTED:
            v = getattr(self, name, None)
            if v is not None and v not in HARMLESS.get(name, ()):
                return name
        return None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v


class _ChatPrompt(_Lenient):
    """What the chat template renders besides the messages: shared by chat and /tokenize, so that
    /tokenize counts exactly the ids a chat request would prefill."""

    tools: list[Tool] | None = Field(None, max_length=128)
    # none: tools are not shown; auto: the model may call one; required / a named function: it must
    # (its arguments constrained to the function's JSON schema)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # pre-open "<think>\n" in the generation prompt: DeepSeek's object or nanoseek's boolean (None = server default)
    thinking: bool | Thinking | None = None

    @field_validator("thinking", mode="before")
    @classmethod
    def _thinking(cls, v):
        # one error naming the field, not one per member of the union
        if v is None or isinstance(v, (bool, Thinking)):
            return v
        if isinstance(v, dict) and v.get("type") in ("enabled", "disabled"):
            return Thinking(**v)
        raise ValueError('expected true, false or {"type": "enabled" | "disabled"}')

    def think(self) -> bool | None:
        if isinstance(self.thinking, Thinking):
            return self.thinking.type == "enabled"
        return self.thinking


class ChatCompletionRequest(_SamplingFields, _ChatPrompt):
    messages: list[ChatMessage] = Field(min_length=1)
    parallel_tool_calls: bool | None = None  # false: at most one call (the first) is returned
    # refused (see UNSUPPORTED): OpenAI's deprecated function calling (use tools), audio, web search
    functions: list[Any] | None = None
    function_call: Any = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    web_search_options: dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(_ChatPrompt):
    """vLLM's /tokenize: ``prompt`` (encoded as /v1/completions encodes it) or ``messages``
    (rendered as /v1/chat/completions renders them); exactly one of the two."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # prompt only: the leading <|bos|>


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class CompletionRequest(_SamplingFields):
    # OpenAI's four shapes: a string, a list of strings, a token list, a list of token lists
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 only with echo: score the prompt without generating (evaluation harnesses' log-likelihood requests)
    max_tokens: int | None = Field(None, ge=0)
    best_of: int | None = None  # refused unless 1 (see UNSUPPORTED)
    suffix: str | None = None  # FIM (DeepSeek's beta): the prompt is the prefix; needs a tokenizer with FIM tokens
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        # one error naming the field (a lone surrogate is check_unicode's 400, not a 422 here)
        if not v:
            raise ValueError("the prompt is empty")
        if isinstance(v, list) and not isinstance(v[0], int):
            if len(v) > 64:
                raise ValueError(f"{len(v)} prompts: at most 64 in one request")
            if any(not p for p in v):
                raise ValueError("a prompt of the list is empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per entry: a string or a token list."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


# ------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Cost(BaseModel):
    """What this request cost at the configured per-million-token prices (USD)."""

    prompt_cache_hit: float
    prompt_cache_miss: float
    completion: float
    total: float
    currency: str = "USD"


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # OpenAI's spelling of prompt_cache_hit_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails
    cost: Cost


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class DeltaToolCall(ResponseToolCall):
    index: int  # the call's place in the message's tool_calls (each streamed call arrives whole)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str = "nanoseek"
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str = "nanoseek"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str = "nanoseek"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoseek"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
