"""Dispatch: the engine requests of one HTTP request, on their variant's LLMServer replicas.

The Router turns an HTTP request into engine requests and makes its answer; the
``Dispatcher`` sends each engine request to its variant's deployment through that variant's
circuit breaker, sends it again when its replica died before the first chunk, merges the
chunks of a request's choices as they come, and keeps each call's record (``Call``): the
Router's latency metrics, the rollout sample, the breaker's verdict and the operators' view
of the streams in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from mlx_serving.deployments.circuit import CircuitBreaker, CircuitConfig, CircuitState
from mlx_serving.deployments.errors import HTTPError, ended_with_error, to_http_error
from mlx_serving.deployments.router_metrics import RouterMetrics
from mlx_serving.deployments.traffic import Route, TrafficSplit
from mlx_serving.deployments.wire import Chunk
from mlx_serving.engine.errors import EngineClosedError, InvalidRequestError

log = logging.getLogger(__name__)

# A request that failed before its first chunk has produced nothing: it is safe to send it
# again, and Serve routes the retry to another replica once the failed one is marked dead.
_START_ATTEMPTS = 3
_RETRY_BACKOFF_S = (0.2, 0.5)

# One started choice: its remote stream, its first chunk and its call.
Started = tuple[Any, Chunk, "Call"]


def close_calls(started: list[Started]) -> None:
    """Let go of the calls of started choices."""
    for _, _, call in started:
        call.close()


def _replica_failed(exc: BaseException) -> bool:
    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError,
                            EngineClosedError))


@dataclass
class ActiveStream:
    """A request the Router is serving, for the operators' admin view."""

    request_id: str
    variant: str
    model: str
    started: float = field(default_factory=time.time)
    replica: str | None = None
    tokens: int = 0

    def view(self) -> dict:
        return {"request_id": self.request_id, "variant": self.variant, "model": self.model,
                "replica": self.replica, "tokens": self.tokens,
                "age_s": round(time.time() - self.started, 3)}


class Call:
    """One engine request on its way through an LLMServer: timing, metrics, admin view, the
    rollout sample it yields and its circuit breaker's verdict.

    Once its first chunk has come, the call owns three things until ``close``: the remote
    stream, its row in the admin view and its variant breaker's admission, which gets the
    call's verdict when the call ends (a stream that fails after its first tokens is a
    failure of its backend too).
    """

    def __init__(self, dispatcher: Dispatcher, route: Route, stream: ActiveStream,
                 started: float, counts_prompt: bool = True):
        self.dispatcher, self.route, self.stream = dispatcher, route, stream
        self.counts_prompt = counts_prompt  # False for a prompt's 2nd..nth choice
        self.variant = route.variant
        self.started = started
        self.first = self.last = None
        self.done = False
        self.gen = None            # the remote stream, once its first chunk has come
        self.verdict_due = False   # whether the variant's breaker awaits this call's verdict
        self.closed = False

    def streaming(self, gen) -> None:
        """The first chunk has come from ``gen``: the call is live until ``close``."""
        self.gen, self.verdict_due = gen, True
        self.dispatcher.active[self.stream.request_id] = self.stream

    def judge(self, exc: BaseException | None = None, last: Chunk | None = None) -> None:
        """Give the variant's breaker this call's verdict, once: from how it ended (``exc``
        or its ``last`` chunk); with neither, the call says nothing about the backend."""
        if self.verdict_due:
            self.verdict_due = False
            self.dispatcher.verdict(self.variant, exc, last)

    def close(self) -> None:
        """Let the call go (idempotent): cancel the remote stream, leave the admin view and
        release the breaker's admission if the call ended without a verdict."""
        if self.closed or self.gen is None:
            return
        self.closed = True
        self.gen.cancel()
        self.dispatcher.active.pop(self.stream.request_id, None)
        self.judge()

    def finish(self, error: bool) -> None:
        """Record the request's sample for the rollout (once)."""
        if self.done:
            return
        self.done = True
        now = time.perf_counter()
        tokens = self.stream.tokens
        itl = ((self.last - self.first) / (tokens - 1)
               if self.first is not None and tokens > 1 else None)
        self.dispatcher.traffic.record(
            self.route, ttft_s=None if self.first is None else self.first - self.started,
            itl_s=itl, e2e_s=now - self.started, error=error)

    def observe(self, chunk: Chunk) -> None:
        now = time.perf_counter()
        m, labels = self.dispatcher.metrics, (self.variant, self.dispatcher.replica)
        if chunk.replica:
            self.stream.replica = chunk.replica
        if chunk.num_tokens:
            if self.last is None:
                self.first = now
                m.ttft.labels(*labels).observe(now - self.started)
            else:
                m.itl.labels(*labels).observe((now - self.last) / chunk.num_tokens)
            self.last = now
            self.stream.tokens += chunk.num_tokens
        if chunk.finished:
            m.e2e.labels(*labels).observe(now - self.started)
            if self.counts_prompt:
                m.prompt_tokens.labels(*labels).inc(chunk.prompt_tokens)
                m.cached_tokens.labels(*labels).inc(chunk.cached_tokens)
            m.generation_tokens.labels(*labels).inc(chunk.completion_tokens)
            self.finish(error=chunk.finish_reason == "error")
            self.judge(last=chunk)


class Dispatcher:
    """Sends a Router's engine requests to the variants' LLMServer deployments (``servers``,
    by variant) and keeps the variants' circuit breakers and the streams in flight."""

    def __init__(self, servers: dict, traffic: TrafficSplit, metrics: RouterMetrics,
                 replica: str, circuit: CircuitConfig):
        self.servers, self.traffic, self.metrics, self.replica = (
            servers, traffic, metrics, replica)
        self.circuit = circuit
        self.active: dict[str, ActiveStream] = {}
        self.breakers: dict[str, CircuitBreaker] = {}

    def stream_views(self) -> list[dict]:
        """The streams in flight, for the admin view (and the Router's gauge of them)."""
        self.metrics.active.labels(self.replica).set(len(self.active))
        return [s.view() for s in list(self.active.values())]

    def circuits(self) -> dict[str, dict]:
        """Every variant's circuit breaker, as its snapshot."""
        return {v: b.snapshot() for v, b in self.breakers.items()}

    def _breaker(self, variant: str) -> CircuitBreaker:
        breaker = self.breakers.get(variant)
        if breaker is None:
            breaker = self.breakers[variant] = CircuitBreaker(
                variant, self.circuit, on_transition=self._on_circuit_change)
            self.metrics.circuit_state.labels(variant, self.replica).set(0)
        return breaker

    def _on_circuit_change(self, variant: str, old: CircuitState, new: CircuitState,
                           reason: str) -> None:
        level = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}[new]
        self.metrics.circuit_state.labels(variant, self.replica).set(level)
        self.metrics.circuit_transitions.labels(variant, self.replica, new.value).inc()

    def _admit(self, route: Route) -> Route:
        """The route after the circuit breakers: a canary whose circuit is open sends its
        traffic to the stable variant (with no rollout sample); an open stable fails fast."""
        if self._breaker(route.variant).admit():
            return route
        stable = self.traffic.table["stable"]
        if route.variant != stable and self._breaker(stable).admit():
            return Route(stable, None, route.epoch)
        breaker = self.breakers[route.variant]
        raise HTTPError(503, f"variant {route.variant!r} is failing; its circuit breaker is "
                             "open", type="service_unavailable_error", code="circuit_open",
                        retry_after=max(1.0, breaker.retry_after_s))

    def verdict(self, variant: str, exc: BaseException | None, last: Chunk | None) -> None:
        """Tell the variant's breaker how its replica handled one call, which ended with
        ``exc`` or with its ``last`` chunk (neither: it ended early, saying nothing)."""
        breaker = self.breakers[variant]
        if exc is None and last is not None:
            breaker.record(not (last.finish_reason == "error"
                                and ended_with_error(last.error, last.error_code).status >= 500))
        elif (isinstance(exc, Exception) and not isinstance(exc, BackPressureError)
              and to_http_error(exc).status >= 500):
            breaker.record(False)
        else:  # invalid input, overload, a client that went away: nothing about the backend
            breaker.release()

    async def _start(self, route: Route, engine_request, counts_prompt: bool = True) -> Started:
        """Send one engine request; returns its stream and first chunk (errors raise here)."""
        stream = ActiveStream(engine_request.request_id, route.variant, engine_request.model)
        call = Call(self, route, stream, time.perf_counter(), counts_prompt)
        for attempt in range(_START_ATTEMPTS):
            route = self._admit(route)
            call.route, call.variant = route, route.variant
            stream.variant = route.variant
            gen = self.servers[route.variant].options(stream=True).generate.remote(
                engine_request, self.traffic.directive(route.variant))
            try:
                first = await gen.__anext__()
                break
            except BaseException as exc:
                gen.cancel()
                self.verdict(route.variant, exc, None)
                if attempt + 1 < _START_ATTEMPTS and _replica_failed(exc):
                    log.warning("request %s: replica failed before its first token (%r); "
                                "retrying", engine_request.request_id, exc)
                    self.metrics.retries.labels(route.variant, self.replica).inc()
                    await asyncio.sleep(_RETRY_BACKOFF_S[attempt])
                    continue
                if not isinstance(exc, (InvalidRequestError, asyncio.CancelledError)):
                    call.finish(error=True)
                raise
        call.streaming(gen)
        call.observe(first)
        return gen, first, call

    async def begin(self, route: Route, engine_requests: list, n: int) -> list[Started]:
        """Start every choice (prompt-major, ``n`` per prompt); a prompt's tokens count once."""
        started = []
        try:
            for i, r in enumerate(engine_requests):
                started.append(await self._start(route, r, counts_prompt=i % n == 0))
        except BaseException:
            close_calls(started)
            raise
        return started

    async def _chunks(self, gen, first: Chunk, call: Call) -> AsyncIterator[Chunk]:
        """The chunks of one choice, its first one included; cancels the remote call on exit."""
        try:
            yield first
            if first.finished:
                return
            async for chunk in gen:
                call.observe(chunk)
                yield chunk
                if chunk.finished:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            call.finish(error=True)
            call.judge(exc)
            raise
        finally:
            call.close()

    async def merged(self, started: list[Started]
                     ) -> AsyncIterator[tuple[int, Chunk | BaseException]]:
        """Chunks of several choices as they come, tagged with the choice index; every call
        is let go when the caller stops reading, wherever it stopped."""
        tasks: list[asyncio.Task] = []
        try:
            if len(started) == 1:
                try:
                    async for chunk in self._chunks(*started[0]):
                        yield 0, chunk
                except Exception as exc:
                    yield 0, exc
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(index, args):
                try:
                    async for chunk in self._chunks(*args):
                        await queue.put((index, chunk))
                except Exception as exc:
                    await queue.put((index, exc))

            tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(started)]
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                yield index, item
                if isinstance(item, BaseException) or item.finished:
                    remaining -= 1
        finally:
            for t in tasks:
                t.cancel()
            close_calls(started)
