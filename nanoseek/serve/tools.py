"""The model's tool calls, read out of its text as it streams (DeepSeek-V3's format, nanoseek/tokenizer.py):

    {content}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\\n```json\\n{arguments}\\n```<｜tool▁call▁end｜>[\\n<｜tool▁call▁begin｜>…]<｜tool▁calls▁end｜>

Why over text, like the think splitter (reasoning.py), rather than over ids: the engine streams
text deltas in which a marker can arrive cut in two, and special tokens decode to their own names,
so the text carries everything the ids do. Content is released as soon as it cannot be the start of
``<｜tool▁calls▁begin｜>``; each call is released whole, when its ``<｜tool▁call▁end｜>`` arrives.
"""

from __future__ import annotations

import re
import uuid

from ..tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_SEP
from .reasoning import _partial_suffix

_CALL = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(.*?)" + re.escape(TOOL_SEP) + r"(.*?)" + re.escape(TOOL_CALL_END),
                   re.S)
_BODY = re.compile(r"(.*?)\n```(?:json)?\n(.*)\n```\s*", re.S)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Feed content deltas; get back (content to show, calls completed), each call a dict with
    ``id``, ``type`` and ``function`` {``name``, ``arguments``} as OpenAI's ``tool_calls``."""

    def __init__(self, max_calls: int | None = None):
        self._buf = ""
        self.in_calls = False
        self.calls: list[dict] = []
        self.max_calls = max_calls  # parallel_tool_calls false: 1 (later calls are dropped)

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self._buf += delta
        if not self.in_calls:
            at = self._buf.find(TOOL_CALLS_BEGIN)
            if at < 0:
                keep = _partial_suffix(self._buf, TOOL_CALLS_BEGIN)
                out, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return out, []
            out, self._buf, self.in_calls = self._buf[:at], self._buf[at + len(TOOL_CALLS_BEGIN):], True
        else:
            out = ""
        new = []
        while (m := _CALL.search(self._buf)) is not None:
            self._buf = self._buf[m.end():]
            body = _BODY.fullmatch(m.group(2))
            name, args = (body.group(1), body.group(2)) if body else (m.group(2).strip(), "{}")
            if self.max_calls is not None and len(self.calls) >= self.max_calls:
                continue
            call = {"id": new_call_id(), "type": "function",
                    "function": {"name": name.strip(), "arguments": args}}
            self.calls.append(call)
            new.append(call)
        return out, new

    def flush(self) -> str:
        """At the end: content still held back (a partial marker that never completed). After a
        finished call, an unfinished one is dropped (the choice's finish_reason says why it
        ended); when no call finished, what the model wrote is content, markers and all."""
        if self.in_calls and not self.calls:
            out = TOOL_CALLS_BEGIN + self._buf
        else:
            out = "" if self.in_calls else self._buf
        self._buf = ""
        return out
