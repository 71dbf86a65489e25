"""The engine in a child process, so that the caller's Python work does not slow its steps.

In a Ray Serve replica the engine thread shares the GIL with Serve's event loops and the
pickling of every streamed chunk, and steps 35-45% slower than in a plain process
(docs/BENCHMARKS.md). ``EngineProcess`` runs the ``Engine`` in a child process instead
(the shape of vLLM V1's EngineCore) and offers the part of its API that LLMServer uses::

    engine = EngineProcess(EngineConfig(models=[ModelConfig(name="demo", path="models/demo")]))
    stream = await engine.submit(request)     # a coroutine: the child validates the request
    async for delta in stream:
        ...
    engine.shutdown(drain_timeout_s=5.0)

Typed messages cross one duplex pipe (``process_wire``). In the child
(``process_child``), every request's stream is a ``_ForwardedStream`` on the child's one event
loop. The engine thread already wakes each event loop once per turn for all the streams it
fed (``stream.wake``); that wake-up sends one ``Deltas``. In the parent a reader thread
hands each batch to the callers' ``RequestStream`` s, again with one wake-up per event loop.

Flow control: the child counts the tokens it sent but the parent's reader has not read
yet (the parent reports reads in ``Reads``) as still buffered, so the scheduler pauses a
sequence whose reader lags and ends it after ``stalled_reader_timeout_s`` as it does in
process; the parent holds at most ``stream_buffer_tokens`` plus one step per request. A
prompt reader's lag looks up to a quarter of the buffer larger in the child than it is.

Failure: if the child exits (crash, kill), the reader thread sees the pipe close or the
process end and ends every open stream with an ``engine_closed`` error; new submits raise
``EngineClosedError`` and ``is_healthy`` is False. The child exits when the parent does
(the pipe closes, or its parent process id changes).

The child is started with multiprocessing's "spawn" method, which imports the parent's
``__main__`` module again in the child: a script that creates an ``EngineProcess`` must keep
its entry point under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

# multiprocessing.connection imports multiprocessing.util, which registers multiprocessing's
# exit handler (it terminates daemonic children); atexit runs handlers last-in first-out, so
# ours, registered below, normally drains the engine first.
from multiprocessing.connection import wait

from mlx_serving.engine.admission import AdmissionSettings
from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import EngineStats
from mlx_serving.engine.errors import EngineClosedError, EngineError, InvalidRequestError
from mlx_serving.engine.model import ModelInfo, ModelTokenizer, pick_model
from mlx_serving.engine.outputs import FinishReason, RequestOutput, Timings, Usage
from mlx_serving.engine.params import GenerationRequest
from mlx_serving.engine.process_child import child_main
from mlx_serving.engine.process_wire import (Cancel, Deltas, GetAdmission, GetStats, Heartbeat,
                                             Reads, Ready, Reply, SetAdmission, Shutdown, Submit,
                                             decode_delta)
from mlx_serving.engine.stream import RequestStream, wake

log = logging.getLogger(__name__)

_STOP_GRACE_S = 30.0   # after the drain, how long the child may take to stop its engine
_CALL_TIMEOUT_S = 30.0


class _ParentStream(RequestStream):
    """A stream fed by the reader thread; tells the child what its reader has consumed.

    Reads are reported once they add up to ``report_every`` tokens: often enough for the
    child to pause and resume the sequence in time (a reader that catches up on a paused
    sequence reads a whole buffer), at a fraction of the messages.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop,
                 on_cancel: Callable[[str], None], reads: _ReadReports, report_every: int):
        super().__init__(request_id, loop, on_cancel)
        self._reads = reads
        self._report_every = report_every
        self._unreported = 0
        self.submitted_at = time.monotonic()
        self.received_tokens = 0

    def push(self, delta: RequestOutput) -> bool:
        self.received_tokens += len(delta.token_ids)
        return super().push(delta)

    async def __anext__(self) -> RequestOutput:
        delta = await super().__anext__()
        self._unreported += len(delta.token_ids)
        # After the final delta the child has forgotten the request.
        if self._unreported >= self._report_every and not delta.finished:
            self._reads.add(self._loop, self.request_id, self._unreported)
            self._unreported = 0
        return delta


class _ReadReports:
    """Tokens read per request, sent to the child in one message per event-loop turn."""

    def __init__(self, send: Callable[[Any], None]):
        self._send = send
        self._lock = threading.Lock()
        # Per event loop, so that a loop that stops before its flush holds back only its own.
        self._tokens: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, int]] = (
            weakref.WeakKeyDictionary())

    def add(self, loop: asyncio.AbstractEventLoop, request_id: str, tokens: int) -> None:
        with self._lock:
            pending = self._tokens.get(loop)
            if pending is None:
                pending = self._tokens[loop] = {}
                loop.call_soon(self._flush, loop)
            pending[request_id] = pending.get(request_id, 0) + tokens

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            tokens = self._tokens.pop(loop)
        self._send(Reads(tokens))


@dataclass
class _Health:
    """What the child last reported; ``dead`` once it has exited."""

    engine_healthy: bool = True
    reported_at: float = field(default_factory=time.monotonic)
    dead: bool = False


_PROCESSES: weakref.WeakSet[EngineProcess] = weakref.WeakSet()


@atexit.register
def _shutdown_processes() -> None:
    for engine in list(_PROCESSES):
        engine.shutdown()


class EngineProcess:
    """An ``Engine`` running in a child process, used from asyncio code in this one.

    Offers what LLMServer uses of ``Engine``, with the same semantics: ``submit`` (a
    coroutine here, since the child validates the request), ``generate``, ``model`` (this
    process loads the tokenizers, so logprob ids decode without a round trip),
    ``list_models``, ``stats``, ``set_admission``, ``admission``, ``is_healthy`` and
    ``shutdown``. The constructor blocks
    until the child has loaded every model, and raises what ``Engine`` would.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        ctx = multiprocessing.get_context("spawn")   # fork is unsafe with MLX's threads
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=child_main, args=(child_conn, config, os.getpid()),
                                    name="mlx-engine", daemon=True)
        self._process.start()
        self._pid = self._process.pid
        self._exitcode: int | None = None
        child_conn.close()  # else the parent would never see the pipe close when the child dies
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()   # guards the fields below
        self._streams: dict[str, _ParentStream] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._accepting = True
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._reads = _ReadReports(self._send)
        self._report_every = max(1, config.stream_buffer_tokens // 4)
        try:
            self._infos = self._wait_ready()
            self._models = {info.name: ModelTokenizer.load(info) for info in self._infos}
        except BaseException:
            self._process.kill()
            self._process.join()
            self._conn.close()
            raise
        self._health = _Health()
        self._reader = threading.Thread(target=self._read_loop, name="mlx-engine-reader",
                                        daemon=True)
        self._reader.start()
        _PROCESSES.add(self)

    def _wait_ready(self) -> list[ModelInfo]:
        msg = None
        if self._conn in wait([self._conn, self._process.sentinel]):
            try:
                msg = self._conn.recv()
            except EOFError:
                pass
        if not isinstance(msg, Ready):
            self._process.join()
            raise EngineClosedError(
                f"the engine process exited while starting (exit code {self._process.exitcode})")
        if msg.error is not None:
            raise msg.error
        return msg.models

    @property
    def pid(self) -> int:
        """The child process's id."""
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """The child's exit code once it has exited and been reaped (negative: a signal)."""
        return self._exitcode

    # -- models ----------------------------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        return list(self._infos)

    def model(self, name: str | None) -> ModelTokenizer:
        """The tokenizer and limits of the model a request names (None: the only one)."""
        return pick_model(self._models, name)

    # -- requests ----------------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and queue a request in the child; returns the stream of its output deltas.

        Unlike ``Engine.submit`` a coroutine: it returns once the child has accepted the
        request, and raises the engine's typed errors (invalid input, QueueFullError,
        EngineClosedError) as ``Engine.submit`` does.
        """
        request_id = request.request_id
        stream = _ParentStream(request_id, asyncio.get_running_loop(), self._cancel, self._reads,
                               self._report_every)
        with self._lock:
            self._check_open()
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use",
                                          param="request_id")
            self._streams[request_id] = stream
        try:
            await asyncio.wrap_future(self._call(lambda call_id: Submit(call_id, request)))
        except BaseException as exc:
            with self._lock:
                if self._streams.get(request_id) is stream:
                    del self._streams[request_id]
            if not isinstance(exc, EngineError):  # cancelled while the child may have queued it
                self._cancel(request_id)
            raise
        return stream

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its deltas; leaving the loop early cancels it."""
        stream = await self.submit(request)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.cancel()

    def _cancel(self, request_id: str) -> None:
        self._send(Cancel(request_id))

    # -- state -----------------------------------------------------------------------------------
    def stats(self, timeout_s: float = _CALL_TIMEOUT_S) -> EngineStats:
        """The child engine's ``EngineStats`` (a round trip; raises TimeoutError if the child
        does not answer within ``timeout_s``)."""
        return self._call(GetStats).result(timeout_s)

    def set_admission(self, scale: float | None = None, shed_batch: bool | None = None,
                      timeout_s: float = _CALL_TIMEOUT_S) -> AdmissionSettings:
        """``Engine.set_admission`` in the child (a round trip); returns the new settings."""
        return self._call(
            lambda call_id: SetAdmission(call_id, scale, shed_batch)).result(timeout_s)

    def admission(self, timeout_s: float = _CALL_TIMEOUT_S) -> AdmissionSettings:
        """The child engine's admission settings (a round trip)."""
        return self._call(GetAdmission).result(timeout_s)

    def is_healthy(self, stuck_after_s: float = 120.0) -> bool:
        """False when the child has exited, its engine reports itself unhealthy, or it has
        not reported for ``stuck_after_s``. Never blocks."""
        h = self._health
        return (not h.dead and h.engine_healthy
                and time.monotonic() - h.reported_at < stuck_after_s)

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop admitting, let running requests finish for up to ``drain_timeout_s``, then stop
        the child. Requests still running afterwards end with finish_reason ``error``.
        Idempotent; also runs at interpreter exit."""
        with self._stop_lock:
            if self._stopped:
                return
            with self._lock:
                self._accepting = False
            self._send(Shutdown(drain_timeout_s))
            # The reader thread reaps the child (only one thread may wait for it).
            self._reader.join(drain_timeout_s + _STOP_GRACE_S)
            if self._reader.is_alive():
                log.warning("the engine process did not stop in time; killing it")
                self._process.kill()
                self._reader.join()
            self._conn.close()
            self._process.close()
            self._stopped = True

    # -- the pipe ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._health.dead:
            raise EngineClosedError("the engine process is not running")
        if not self._accepting:
            raise EngineClosedError("the engine is shutting down")

    def _send(self, msg) -> None:
        """Send to the child from any thread; a child that has gone is the reader's to report."""
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError:
            pass

    def _call(self, make_msg: Callable[[int], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._health.dead:
                raise EngineClosedError("the engine process is not running")
            call_id = next(self._call_ids)
            self._calls[call_id] = future
        self._send(make_msg(call_id))
        return future

    def _read_loop(self) -> None:
        """The reader thread: dispatch the child's messages until it exits.

        Never sends: the child may be blocked sending to us while we would wait on it.
        """
        try:
            while self._conn in wait([self._conn, self._process.sentinel]):
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            pass
        except BaseException:
            log.exception("the engine process reader failed; stopping the engine process")
            self._process.kill()
        finally:
            self._process.join()
            self._on_child_exit()

    def _dispatch(self, msg) -> None:
        if isinstance(msg, Deltas):
            to_wake = []
            with self._lock:
                for item in msg.items:
                    delta = decode_delta(item)
                    stream = (self._streams.pop(delta.request_id, None) if delta.finished
                              else self._streams.get(delta.request_id))
                    if stream is not None and stream.push(delta):
                        to_wake.append(stream)
            wake(to_wake)
        elif isinstance(msg, Reply):
            with self._lock:
                future = self._calls.pop(msg.call_id)
            if future.set_running_or_notify_cancel():  # False: the caller stopped waiting
                if msg.error is not None:
                    future.set_exception(msg.error)
                else:
                    future.set_result(msg.value)
        elif isinstance(msg, Heartbeat):
            self._health.engine_healthy = msg.healthy
            self._health.reported_at = time.monotonic()

    def _on_child_exit(self) -> None:
        """End every open stream and call: the child is gone."""
        self._exitcode = self._process.exitcode
        reason = f"the engine process exited (exit code {self._exitcode})"
        with self._lock:
            self._health.dead = True
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        for future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineClosedError(reason))
        now = time.monotonic()
        for stream in streams:
            stream.push(RequestOutput(
                stream.request_id, finish_reason=FinishReason.ERROR, error=reason,
                error_code=EngineClosedError.code, usage=Usage(0, stream.received_tokens),
                timings=Timings(total_s=now - stream.submitted_at)))
        wake(streams)


