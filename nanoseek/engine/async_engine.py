"""`AsyncEngine`: the engine behind an asyncio server.

One background thread runs `Engine.step()` while there is work and sleeps when there is none;
each request gets an asyncio.Queue that the thread feeds with `call_soon_threadsafe`. A lock
serialises the engine: adds, aborts and prompt scoring land between steps, never inside one. Cancelling or
closing a stream (a client that disconnects) aborts its request, which frees its cache blocks.
A request that fails inside the engine (finish_reason "error") raises RequestFailedError in its
own stream only; the engine isolates it and serves the others on.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from .engine import Engine, RequestFailedError, StreamEvent


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self.engine.num_waiting

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.engine.has_unfinished():
                    self._cv.wait()
                if self._stop:
                    return
                try:
                    events: list = self.engine.step()
                except Exception as e:  # outside any one request (planning): fail them all, never the thread
                    events = []
                    for rid in list(self._queues):
                        self.engine.abort(rid)
                        events.append(RequestFailedError(rid, f"{type(e).__name__}: {e}"))
                    self.engine.step()  # drain the abort events
                events = [RequestFailedError(ev.request_id, ev.error or "unknown error")
                          if isinstance(ev, StreamEvent) and ev.finish_reason == "error" else ev for ev in events]
                targets = [(self._queues.get(ev.request_id), ev) for ev in events]
            for target, item in targets:
                if target is not None:
                    loop, q = target
                    try:
                        loop.call_soon_threadsafe(q.put_nowait, item)
                    except RuntimeError:  # that event loop is closed
                        pass

    async def generate_stream(self, prompt_ids, params, request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        """Events of one request as they are produced. Raises PromptTooLongError before the first."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._cv:
            rid = self.engine.add_request(prompt_ids, params, request_id)
            self._queues[rid] = (loop, q)
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, RequestFailedError):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            with self._cv:
                self._queues.pop(rid, None)
                if not finished:
                    self.engine.abort(rid)
                    self._cv.notify()

    def score(self, prompt_ids: list[int], top: int = 0) -> tuple[list[float], list[dict[int, float]]]:
        """`Engine.score` between two steps (blocking: run it with asyncio.to_thread)."""
        with self._cv:
            return self.engine.score(prompt_ids, top)

    def shutdown(self) -> None:
        """Stop the step thread (after the step in flight); requests still running are aborted."""
        with self._cv:
            self._stop = True
            for rid in list(self._queues):
                self.engine.abort(rid)
            self._cv.notify_all()
        self._thread.join(timeout=30)
