"""nanoseek's inference engine: paged latent KV cache, continuous batching, prefix caching,
sampling and streaming detokenisation. `Engine` is synchronous; `AsyncEngine` wraps it for servers."""

from .async_engine import AsyncEngine
from .engine import Engine, PromptTooLongError, RequestOutput, StreamEvent
from .sampling import SamplingParams, TokenLogprob

__all__ = ["Engine", "AsyncEngine", "SamplingParams", "RequestOutput", "StreamEvent", "PromptTooLongError",
           "TokenLogprob"]
