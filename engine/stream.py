"""The bridge between the engine thread and one asyncio caller.

The engine thread pushes deltas; the caller iterates them. Unread deltas are coalesced
into one (never dropped), and ``buffered_tokens`` tells the engine how far the reader
lags so it can pause the sequence instead of letting the buffer grow.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

from mlx_serving.engine.outputs import RequestOutput

# (request_id, the caller's event loop, cancel callback) -> the request's stream
StreamFactory = Callable[[str, asyncio.AbstractEventLoop, Callable[[str], None]], "RequestStream"]


class RequestStream:
    """The caller's end of one request: an async iterator of ``RequestOutput`` deltas."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop,
                 on_cancel: Callable[[str], None]):
        self.request_id = request_id
        self._loop = loop
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self._pending: RequestOutput | None = None
        self._ready = asyncio.Event()
        self._finished = False   # the final delta was handed to the reader
        self._closed = False     # the caller cancelled or went away
        self._hold: asyncio.Future | None = None  # a ``hold`` in progress
        self.last_read = time.monotonic()

    # -- engine-thread side ------------------------------------------------------------
    def push(self, delta: RequestOutput) -> bool:
        """Queue a delta (engine thread); never blocks.

        Returns True when the reader may be asleep and must be woken with ``wake``.
        """
        with self._lock:
            if self._pending is None:
                self._pending = delta
                return True
            self._pending.merge(delta)
            return delta.finished  # the reader is awake, but a ``hold`` must end now

    @property
    def buffered_tokens(self) -> int:
        """Tokens pushed but not yet read."""
        pending = self._pending
        return len(pending.token_ids) if pending is not None else 0

    @property
    def closed(self) -> bool:
        return self._closed

    def _set_ready(self) -> None:
        self._ready.set()
        if self._hold is not None and self._final_is_pending():
            _release(self._hold)

    def _final_is_pending(self) -> bool:
        pending = self._pending
        return pending is not None and pending.finished

    # -- caller side ---------------------------------------------------------------------
    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._finished:
            with self._lock:
                delta, self._pending = self._pending, None
                if delta is None:
                    self._ready.clear()
            if delta is not None:
                self.last_read = time.monotonic()
                self._finished = delta.finished
                return delta
            await self._ready.wait()
        raise StopAsyncIteration

    async def hold(self, seconds: float) -> None:
        """Let deltas coalesce for up to ``seconds``; returns at once when the final delta
        is (or becomes) pending, so a request's last chunk is never held back."""
        if seconds <= 0 or self._final_is_pending():
            return
        self._hold = self._loop.create_future()
        timer = self._loop.call_later(seconds, _release, self._hold)
        try:
            await self._hold
        finally:
            timer.cancel()
            self._hold = None

    @property
    def finished(self) -> bool:
        return self._finished

    def cancel(self) -> None:
        """Stop the request; the engine drops its sequence within one step."""
        if not self._finished and not self._closed:
            self._closed = True
            self._on_cancel(self.request_id)


def wake(streams: list[RequestStream]) -> None:
    """Wake the readers of ``streams``: one cross-thread call per event loop, not per stream.

    Each ``call_soon_threadsafe`` writes to the loop's self-pipe; with dozens of streams
    per decode step, batching them is a measurable share of the step.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[RequestStream]] = {}
    for stream in streams:
        by_loop.setdefault(stream._loop, []).append(stream)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, group)
        except RuntimeError:  # that caller's event loop is gone
            for stream in group:
                stream._closed = True


def _release(hold: asyncio.Future) -> None:
    if not hold.done():
        hold.set_result(None)


def _set_all(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream._set_ready()
