"""Incremental detokenisation: ids arrive one at a time, text leaves in safe pieces.

Two hazards of streaming a byte-level BPE model:

* one character of UTF-8 (é, 中, an emoji) is often split over two or three tokens, so decoding
  token by token would print U+FFFD halves. We keep the *bytes* of every token (from the
  byte-level alphabet) and push them through Python's incremental UTF-8 decoder, which returns
  only complete characters and holds an unfinished one until its last byte arrives.
* a stop string ("\\n\\nUser:") may arrive a piece at a time. Text that could still be the start
  of a stop string is held back; once the stop string is complete, everything from it on is
  dropped, so a stop string is never partially (or fully) emitted.

Tokenizers that are not byte-level fall back to decoding the whole output and diffing (slower,
same guarantees as far as the tokenizer's decode allows).
"""

from __future__ import annotations

import codecs


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: printable bytes stand for themselves, the other 68 bytes are
    shifted to code points 256+ so every byte has a visible, non-whitespace character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def token_bytes_table(tokenizer) -> list[bytes] | None:
    """Each id's bytes, or None when the tokenizer is not byte-level BPE."""
    backend = getattr(tokenizer, "_tok", None)
    if backend is None:
        return None
    inv = {c: b for b, c in bytes_to_unicode().items()}
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
    table = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        if i in added:
            table.append(added[i].encode())
            continue
        tok = backend.id_to_token(i)
        if tok is None:
            table.append(b"")
            continue
        try:
            table.append(bytes(inv[c] for c in tok))
        except KeyError:
            return None
    return table


class Detokenizer:
    """Feed ids, get text deltas that never end in half a character or half a stop string."""

    def __init__(self, tokenizer, stop: list[str] = (), table: list[bytes] | None = None, skip: bytes = b""):
        self.tokenizer = tokenizer
        self.table = table
        self.skip = skip  # the first output bytes that are the prompt's own (token healing): not shown
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []  # fallback path only
        self.decoded = ""  # fallback path only
        self.pending = ""  # decoded text not yet emitted (a possible stop-string start)
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _decode_new(self, token: int | None, final: bool) -> str:
        if self.tokenizer is None:
            return ""
        if self.table is not None:
            b = self.table[token] if token is not None and 0 <= token < len(self.table) else b""
            if self.skip:
                n = len(b) if self.skip.startswith(b) else len(self.skip)
                b, self.skip = b[n:], self.skip[n:]
            return self.utf8.decode(b, final=final)
        if token is not None:
            self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        if not final and full.endswith("\ufffd"):
            return ""  # an unfinished character: wait for its next bytes
        new, self.decoded = full[len(self.decoded):], full
        return new

    def _emit(self, new: str, final: bool) -> str:
        buf = self.pending + new
        if self.stop:
            hits = [(buf.find(s), s) for s in self.stop if s in buf]
            if hits:
                self.stopped = True
                out, self.pending = buf[: min(hits)[0]], ""
                self.text += out
                return out
        keep = 0
        if self.stop and not final:  # hold back the longest tail that could start a stop string
            for k in range(min(self.hold, len(buf)), 0, -1):
                if any(s.startswith(buf[-k:]) for s in self.stop):
                    keep = k
                    break
        out, self.pending = (buf[:-keep], buf[-keep:]) if keep else (buf, "")
        self.text += out
        return out

    def add(self, token: int, visible: bool = True) -> str:
        """The next generated id → text safe to show now. `visible=False` (a stop token) adds no text."""
        return self._emit(self._decode_new(token if visible else None, final=False), final=False)

    def flush(self) -> str:
        """At the end of generation: whatever was held back (an unfinished final character shows as U+FFFD)."""
        if self.stopped:
            return ""
        return self._emit(self._decode_new(None, final=True), final=True)
