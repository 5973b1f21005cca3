"""Split a streamed completion into ``reasoning_content`` (inside ``<think>…</think>``) and ``content``.

Why a state machine over text deltas rather than a regex over the final text: the API must
stream reasoning chunks *as they arrive* and then switch to content chunks, and the markers can
arrive cut in two (``"</thi"`` + ``"nk>"``) when the engine's detokenizer holds back bytes or a
stop string is pending. So the splitter holds back only what could still turn into a marker and
emits everything else at once.

Whitespace rules mirror the chat template (``<think>\\n{reasoning}\\n</think>\\n{content}``): the
newlines the template puts around the reasoning belong to the format, not to the text, so the
reasoning is stripped at both ends and the content's leading whitespace after ``</think>`` is
dropped. Trailing whitespace inside the reasoning is held back until we know whether ``</think>``
follows it.

Two ways reasoning starts, both handled: the template pre-opened ``<think>\\n`` in the prompt
(``in_think=True``: the first generated token is already reasoning), or the model writes
``<think>`` itself as its first non-blank output.
"""

from __future__ import annotations

THINK, END_THINK = "<think>", "</think>"
REASONING, CONTENT = "reasoning", "content"


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Feed text deltas, get ``[(kind, text), …]`` with kind ``"reasoning"`` or ``"content"``."""

    def __init__(self, in_think: bool = False):
        self.state = "think" if in_think else "start"
        self._buf = ""  # text held back (possible marker prefix / trailing whitespace)
        self._reasoning_started = False  # leading whitespace of reasoning is dropped
        self._content_started = not in_think  # after </think>, leading whitespace is dropped
        self.saw_think = in_think

    def feed(self, delta: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._buf += delta
        while self._buf:
            if self.state == "start":
                stripped = self._buf.lstrip()
                if stripped.startswith(THINK):
                    self._buf = stripped[len(THINK):]
                    self.state, self.saw_think = "think", True
                    continue
                if stripped and THINK.startswith(stripped) or not stripped:
                    break  # could still become "<think>": wait for more text
                self.state = "content"
                continue
            if self.state == "think":
                i = self._buf.find(END_THINK)
                if i >= 0:
                    self._emit_reasoning(out, self._buf[:i].rstrip())
                    self._buf = self._buf[i + len(END_THINK):]
                    self.state, self._content_started = "content", False
                    continue
                hold = _partial_suffix(self._buf, END_THINK)
                body = self._buf[: len(self._buf) - hold]
                keep = len(body) - len(body.rstrip())  # trailing blanks: maybe just before </think>
                emit = body[: len(body) - keep]
                self._emit_reasoning(out, emit)
                self._buf = self._buf[len(emit):]
                break
            # content: everything passes, except leading blanks right after </think>
            text = self._buf
            if not self._content_started:
                text = text.lstrip()
                if not text:
                    self._buf = ""
                    break
                self._content_started = True
            out.append((CONTENT, text))
            self._buf = ""
        return _merge(out)

    def flush(self) -> list[tuple[str, str]]:
        """End of generation: release whatever was held back."""
        out: list[tuple[str, str]] = []
        if self.state == "think":
            self._emit_reasoning(out, self._buf.rstrip())
        elif self.state == "start" and self._buf.strip():
            out.append((CONTENT, self._buf))
        elif self.state == "content" and self._buf:
            out.append((CONTENT, self._buf))
        self._buf = ""
        return out

    def _emit_reasoning(self, out: list, text: str) -> None:
        if not self._reasoning_started:
            text = text.lstrip()
        if text:
            self._reasoning_started = True
            out.append((REASONING, text))


def _merge(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    merged: list[tuple[str, str]] = []
    for kind, text in pieces:
        if merged and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


def split_reasoning(text: str, in_think: bool = False) -> tuple[str | None, str]:
    """Whole-text form: ``(reasoning_content or None, content)``."""
    s = ThinkSplitter(in_think)
    pieces = s.feed(text) + s.flush()
    reasoning = "".join(t for k, t in pieces if k == REASONING)
    content = "".join(t for k, t in pieces if k == CONTENT)
    return (reasoning if s.saw_think else None), content


def count_reasoning_tokens(token_ids: list[int], end_think_id: int, think_id: int, in_think: bool) -> int:
    """Completion tokens billed as reasoning: everything up to and including ``</think>``.

    Counted on ids, not text, so the figure is exact whatever the detokenizer did. With no
    ``</think>``, a trace still open at the end (pre-opened, or started by the model) is all
    reasoning; an answer that never thought has none.
    """
    if end_think_id in token_ids:
        return token_ids.index(end_think_id) + 1
    if in_think or (token_ids and token_ids[0] == think_id):
        return len(token_ids)
    return 0
