"""The child process of ``EngineProcess``: one event loop feeding an ``Engine`` and
forwarding its output to the parent, one message per engine turn."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.errors import EngineError
from mlx_serving.engine.outputs import RequestOutput
from mlx_serving.engine.params import GenerationRequest
from mlx_serving.engine.process_wire import (Cancel, Deltas, GetAdmission, GetStats, Heartbeat,
                                             Reads, Ready, Reply, SetAdmission, Shutdown,
                                             Submit, encode_delta, portable_error)
from mlx_serving.engine.stream import RequestStream

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0   # how often the child reports its engine's health


class _ForwardedStream(RequestStream):
    """The child's end of a request, whose reader is the parent process.

    Tokens sent to the parent but not yet read there still count as buffered, so the
    scheduler's backpressure (pause, stalled-reader timeout) acts on the real reader.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop,
                 on_cancel: Callable[[str], None], on_ready: Callable[[_ForwardedStream], None]):
        super().__init__(request_id, loop, on_cancel)
        self._on_ready = on_ready
        self.unread = 0   # tokens sent to the parent that its reader has not read yet

    @property
    def buffered_tokens(self) -> int:
        return super().buffered_tokens + self.unread

    def _set_ready(self) -> None:
        self._on_ready(self)

    def take(self) -> RequestOutput | None:
        """The pending delta, to send to the parent."""
        with self._lock:
            delta, self._pending = self._pending, None
        if delta is not None:
            self.unread += len(delta.token_ids)
            self._finished = delta.finished
        return delta

    def read(self, tokens: int) -> None:
        """The parent's reader has consumed ``tokens``."""
        self.unread -= tokens
        self.last_read = time.monotonic()


def child_main(conn: Connection, config: EngineConfig, parent_pid: int) -> None:
    """The child process: load the engine, then serve the parent until it stops or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the parent's to handle
    try:
        engine = Engine(config)
    except BaseException as exc:
        conn.send(Ready([], portable_error(exc)))
        return
    conn.send(Ready(engine.list_models()))
    asyncio.run(_Child(engine, conn, parent_pid).serve())


class _Child:
    """The child process's event loop: feeds the engine and forwards its output.

    Every send happens on this loop's thread.
    """

    def __init__(self, engine: Engine, conn: Connection, parent_pid: int):
        self.engine = engine
        self.conn = conn
        self.parent_pid = parent_pid
        self.streams: dict[str, _ForwardedStream] = {}
        self.to_forward: list[_ForwardedStream] = []   # given output since the last forward
        self.forward_scheduled = False

    async def serve(self) -> None:
        """Run until the parent asks to stop or goes away, then stop the engine."""
        self.loop = asyncio.get_running_loop()
        self.stop = self.loop.create_future()   # its result: the drain timeout
        self.loop.add_reader(self.conn.fileno(), self._on_readable)
        heartbeat = self.loop.create_task(self._heartbeat())
        drain_timeout_s = await self.stop
        # On a worker thread: the loop keeps forwarding (and taking reads) while it drains.
        await asyncio.to_thread(self.engine.shutdown, drain_timeout_s)
        heartbeat.cancel()
        self._forward(list(self.streams.values()))   # the ends of requests cut short
        self.loop.remove_reader(self.conn.fileno())
        self.conn.close()

    def _request_stop(self, drain_timeout_s: float) -> None:
        if not self.stop.done():
            self.stop.set_result(drain_timeout_s)

    def _send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except OSError:   # the parent is gone
            self._request_stop(0.0)

    def _on_readable(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):   # the parent is gone
            self.loop.remove_reader(self.conn.fileno())
            self._request_stop(0.0)

    def _handle(self, msg) -> None:
        if isinstance(msg, Reads):
            for request_id, tokens in msg.tokens.items():
                stream = self.streams.get(request_id)
                if stream is not None:
                    stream.read(tokens)
        elif isinstance(msg, Submit):
            self._answer(msg.call_id, lambda: self._open(msg.request))
        elif isinstance(msg, Cancel):
            stream = self.streams.get(msg.request_id)
            if stream is not None:
                stream.cancel()
        elif isinstance(msg, GetStats):
            self._answer(msg.call_id, self.engine.stats)
        elif isinstance(msg, SetAdmission):
            self._answer(msg.call_id,
                         lambda: self.engine.set_admission(msg.scale, msg.shed_batch))
        elif isinstance(msg, GetAdmission):
            self._answer(msg.call_id, self.engine.admission)
        elif isinstance(msg, Shutdown):
            self._request_stop(msg.drain_timeout_s)

    def _answer(self, call_id: int, fn: Callable[[], Any]) -> None:
        """Run ``fn`` and send its result, or its error, to the parent's waiting call."""
        try:
            value = fn()
        except Exception as exc:
            if not isinstance(exc, EngineError):
                log.exception("a call from the parent process failed")
            self._send(Reply(call_id, error=portable_error(exc)))
        else:
            self._send(Reply(call_id, value))

    def _open(self, request: GenerationRequest) -> None:
        stream = self.engine.submit(request, self._new_stream)
        self.streams[stream.request_id] = stream

    def _new_stream(self, request_id: str, loop: asyncio.AbstractEventLoop,
                    on_cancel: Callable[[str], None]) -> _ForwardedStream:
        return _ForwardedStream(request_id, loop, on_cancel, self._on_stream_ready)

    def _on_stream_ready(self, stream: _ForwardedStream) -> None:
        # The engine thread wakes this loop once per turn for all the streams it fed
        # (stream.wake), so forwarding on the next pass sends one message per turn.
        self.to_forward.append(stream)
        if not self.forward_scheduled:
            self.forward_scheduled = True
            self.loop.call_soon(self._forward_ready)

    def _forward_ready(self) -> None:
        streams, self.to_forward, self.forward_scheduled = self.to_forward, [], False
        self._forward(streams)

    def _forward(self, streams: list[_ForwardedStream]) -> None:
        items = []
        for stream in streams:
            delta = stream.take()
            if delta is None:
                continue
            items.append(encode_delta(delta))
            if delta.finished:
                self.streams.pop(stream.request_id, None)
        if items:
            self._send(Deltas(items))

    async def _heartbeat(self) -> None:
        while True:
            if os.getppid() != self.parent_pid:  # the parent died; the pipe may live on in a fork
                self._request_stop(0.0)
                return
            self._send(Heartbeat(self.engine.is_healthy()))
            await asyncio.sleep(HEARTBEAT_S)
