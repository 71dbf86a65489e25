"""The Router: the application's HTTP ingress (FastAPI through ``@serve.ingress``).

It validates requests, picks the variant, streams chunks from an LLMServer replica back
as OpenAI JSON or SSE, and records per-variant latency metrics.
"""


import asyncio
import hmac
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from mlx_serving.deployments.catalog import ModelCatalog
from mlx_serving.deployments.circuit import CircuitBreaker, CircuitState
from mlx_serving.deployments.errors import (
    HTTPError, bad_request, ended_with_error, to_http_error)
from mlx_serving.deployments import openapi
from mlx_serving.deployments.openai_format import (
    Choice, chat_logprobs, completion_logprobs, sse, usage)
from mlx_serving.deployments.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList,
    TokenizeRequest, new_id)
from mlx_serving.deployments.replica_routing import routing_views
from mlx_serving.deployments.router_metrics import RouterMetrics
from mlx_serving.deployments.settings import AppConfig
from mlx_serving.deployments.telemetry import Reporter, replica_id, route_logs_to_serve
from mlx_serving.deployments.traffic import Route, TrafficSplit
from mlx_serving.deployments.wire import Chunk
from mlx_serving.engine.errors import EngineClosedError, InvalidRequestError
from mlx_serving.engine.params import Priority

log = logging.getLogger(__name__)

app = FastAPI(title="mlx-serving", description="OpenAI-compatible LLM serving on MLX and Ray Serve.")
openapi.install(app)  # /openapi.json with the bodies the endpoints read by hand


def error_response(exc: BaseException, extra_headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI-shaped JSON answer for any failure (mapping in deployments/errors.py)."""
    err = to_http_error(exc)
    return JSONResponse(err.body(), status_code=err.status,
                        headers={**err.headers(), **(extra_headers or {})})


@app.exception_handler(StarletteHTTPException)
async def _openai_shaped_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Unknown paths and methods answer in OpenAI's error shape too."""
    err = HTTPError(exc.status_code, str(exc.detail), type="invalid_request_error",
                    code="not_found" if exc.status_code == 404 else "method_not_allowed")
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


def _failure(item: "Chunk | BaseException") -> HTTPError | None:
    """The HTTP error for a failed choice (an exception, or a chunk that ended in error)."""
    if isinstance(item, BaseException):
        return to_http_error(item)
    if item.finish_reason == "error":
        return ended_with_error(item.error, item.error_code)
    return None


# A request that failed before its first chunk has produced nothing: it is safe to send it
# again, and Serve routes the retry to another replica once the failed one is marked dead.
_START_ATTEMPTS = 3
_RETRY_BACKOFF_S = (0.2, 0.5)


def _close_calls(started: list) -> None:
    """Let go of the calls of started choices (``Router._start``'s triples)."""
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


_PRIORITY_HEADER = "x-priority"
_TIMEOUT_HEADER = "x-request-timeout"


def service_class(body, headers) -> tuple[str, float | None]:
    """A request's priority class and deadline: the body's fields, else the headers.

    ``X-Priority: interactive|batch`` and ``X-Request-Timeout: SECONDS`` let load tools and
    proxies set them without touching bodies; a body field wins over its header. A header
    is checked even where the body's field wins: a malformed one is an error, not ignored.
    """
    header_priority = headers.get(_PRIORITY_HEADER)
    if header_priority is not None:
        header_priority = header_priority.strip().lower()
        if header_priority not in ("interactive", "batch"):
            raise bad_request(f"X-Priority: must be 'interactive' or 'batch', got "
                              f"{header_priority!r}", "X-Priority")
    raw = headers.get(_TIMEOUT_HEADER)
    header_timeout = None
    if raw is not None:
        try:
            header_timeout = float(raw)
        except ValueError:
            header_timeout = -1.0
        if not 0 < header_timeout < float("inf"):
            raise bad_request(f"X-Request-Timeout: must be a positive number of seconds, "
                              f"got {raw!r}", "X-Request-Timeout")
    priority = body.priority or header_priority or "interactive"
    timeout_s = body.timeout_s if body.timeout_s is not None else header_timeout
    return priority, timeout_s


class _Call:
    """One engine request on its way through an LLMServer: timing, metrics, admin view, the
    rollout sample it yields and its circuit breaker's verdict.

    Once its first chunk has come, the call owns three things until ``close``: the remote
    stream, its row in the admin view and its variant breaker's admission, which gets the
    call's verdict when the call ends (a stream that fails after its first tokens is a
    failure of its backend too).
    """

    def __init__(self, router: "Router", route: Route, stream: ActiveStream, started: float,
                 counts_prompt: bool = True):
        self.router, self.route, self.stream = router, route, stream
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
        self.router._active[self.stream.request_id] = self.stream

    def judge(self, exc: BaseException | None = None, last: Chunk | None = None) -> None:
        """Give the variant's breaker this call's verdict, once: from how it ended (``exc``
        or its ``last`` chunk); with neither, the call says nothing about the backend."""
        if self.verdict_due:
            self.verdict_due = False
            self.router._verdict(self.variant, exc, last)

    def close(self) -> None:
        """Let the call go (idempotent): cancel the remote stream, leave the admin view and
        release the breaker's admission if the call ended without a verdict."""
        if self.closed or self.gen is None:
            return
        self.closed = True
        self.gen.cancel()
        self.router._active.pop(self.stream.request_id, None)
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
        self.router._traffic.record(
            self.route, ttft_s=None if self.first is None else self.first - self.started,
            itl_s=itl, e2e_s=now - self.started, error=error)

    def observe(self, chunk: Chunk) -> None:
        now = time.perf_counter()
        m, labels = self.router._metrics, (self.variant, self.router._replica)
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


# Routers outlive LLMServer's 30 s drain on redeploys, so in-flight streams can finish.
@serve.deployment(name="Router", num_replicas=2, max_ongoing_requests=512,
                  graceful_shutdown_timeout_s=40, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Router:
    """OpenAI-compatible ingress in front of the variants' LLMServer deployments."""

    def __init__(self, config: dict, servers: dict, telemetry=None, controller=None):
        route_logs_to_serve()
        self.config = AppConfig.model_validate(config)
        self._servers = servers
        self._telemetry = telemetry
        self._controller = controller
        self._traffic = TrafficSplit(controller, self.config.stable)
        env_keys = [k for k in os.environ.get("MLX_SERVING_API_KEYS", "").split(",") if k]
        self._api_keys = [k.encode() for k in
                          [s.get_secret_value() for s in self.config.api_keys] + env_keys]
        token = ((self.config.operator_token and self.config.operator_token.get_secret_value())
                 or os.environ.get("MLX_SERVING_OPERATOR_TOKEN"))
        self._operator_token = token.encode() if token else None
        self._replica = replica_id()
        self._metrics = RouterMetrics(self._replica)
        self._active: dict[str, ActiveStream] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._catalog = ModelCatalog(servers)
        self._reporter = None
        if telemetry is not None:
            self._reporter = Reporter(telemetry, f"router:{self._replica}", self._metrics.registry,
                                      self._stream_views).start()

    def _stream_views(self) -> list[dict]:
        self._metrics.active.labels(self._replica).set(len(self._active))
        return [s.view() for s in list(self._active.values())]

    # -- request plumbing -------------------------------------------------------------------------
    def _check_api_key(self, request: Request) -> None:
        if not self._api_keys:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip().encode() if auth.lower().startswith("bearer ") else b""
        if not any(hmac.compare_digest(given, k) for k in self._api_keys):
            raise HTTPError(401, "missing or invalid API key (Authorization: Bearer ...)",
                            type="authentication_error", code="invalid_api_key")

    def _refusal(self, request: Request) -> Response | None:
        """The error response for a request without the operator token; None with it."""
        try:
            self._check_operator(request)
        except HTTPError as err:
            return error_response(err)
        return None

    def _check_operator(self, request: Request) -> None:
        if self._operator_token is None:
            raise HTTPError(403, "the admin API is disabled: no operator token is configured",
                            type="permission_error", code="admin_disabled")
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise HTTPError(401, "operator token required (Authorization: Bearer ...)",
                            type="authentication_error", code="missing_operator_token")
        if not hmac.compare_digest(auth[7:].strip().encode(), self._operator_token):
            raise HTTPError(403, "wrong operator token", type="permission_error",
                            code="invalid_operator_token")

    async def _read_json(self, request: Request, empty: Any = None) -> Any:
        """The body as JSON, within max_body_bytes; ``empty`` (if given) for an empty body."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"request body exceeds {limit} bytes", type="invalid_request_error",
                            code="body_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise HTTPError(413, f"request body exceeds {limit} bytes",
                                type="invalid_request_error", code="body_too_large")
        if not body and empty is not None:
            return empty
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise bad_request("the body is nested too deeply", code="invalid_json") from None

    @staticmethod
    def _parse(model_cls, body: Any):
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        try:
            return model_cls.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            msg = first["msg"].removeprefix("Value error, ")
            if first["type"] == "extra_forbidden":
                msg = f"unrecognized request field {param!r}"
            raise bad_request(f"{param + ': ' if param else ''}{msg}", param) from None

    async def _resolve(self, model: str, key: str = "") -> tuple[Route, str]:
        """The route for a request (sticky ``key``) and the model name it asks for."""
        route = self._traffic.route(key)
        stable = self._traffic.table["stable"]
        if route.variant != stable:
            if model in await self._catalog.names(route.variant):
                return route, model
            route = Route(stable, None, route.epoch)  # the canary lacks it: no sample
        names = await self._catalog.require(stable)
        if model in names:
            return route, model
        raise HTTPError(404, f"the model {model!r} does not exist; served: {names}",
                        type="not_found_error", param="model", code="model_not_found")

    def _breaker(self, variant: str) -> CircuitBreaker:
        breaker = self._breakers.get(variant)
        if breaker is None:
            breaker = self._breakers[variant] = CircuitBreaker(
                variant, self.config.circuit_breaker, on_transition=self._on_circuit_change)
            self._metrics.circuit_state.labels(variant, self._replica).set(0)
        return breaker

    def _on_circuit_change(self, variant: str, old: CircuitState, new: CircuitState,
                           reason: str) -> None:
        level = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}[new]
        self._metrics.circuit_state.labels(variant, self._replica).set(level)
        self._metrics.circuit_transitions.labels(variant, self._replica, new.value).inc()

    def _admit(self, route: Route) -> Route:
        """The route after the circuit breakers: a canary whose circuit is open sends its
        traffic to the stable variant (with no rollout sample); an open stable fails fast."""
        if self._breaker(route.variant).admit():
            return route
        stable = self._traffic.table["stable"]
        if route.variant != stable and self._breaker(stable).admit():
            return Route(stable, None, route.epoch)
        breaker = self._breakers[route.variant]
        raise HTTPError(503, f"variant {route.variant!r} is failing; its circuit breaker is "
                             "open", type="service_unavailable_error", code="circuit_open",
                        retry_after=max(1.0, breaker.retry_after_s))

    def _verdict(self, variant: str, exc: BaseException | None, last: Chunk | None) -> None:
        """Tell the variant's breaker how its replica handled one call, which ended with
        ``exc`` or with its ``last`` chunk (neither: it ended early, saying nothing)."""
        breaker = self._breakers[variant]
        if exc is None and last is not None:
            breaker.record(not (last.finish_reason == "error"
                                and ended_with_error(last.error, last.error_code).status >= 500))
        elif (isinstance(exc, Exception) and not isinstance(exc, BackPressureError)
              and to_http_error(exc).status >= 500):
            breaker.record(False)
        else:  # invalid input, overload, a client that went away: nothing about the backend
            breaker.release()

    async def _start(self, route: Route, engine_request,
                     counts_prompt: bool = True) -> tuple[Any, Chunk, _Call]:
        """Send one engine request; returns its stream and first chunk (errors raise here)."""
        stream = ActiveStream(engine_request.request_id, route.variant, engine_request.model)
        call = _Call(self, route, stream, time.perf_counter(), counts_prompt)
        for attempt in range(_START_ATTEMPTS):
            route = self._admit(route)
            call.route, call.variant = route, route.variant
            stream.variant = route.variant
            gen = self._servers[route.variant].options(stream=True).generate.remote(
                engine_request, self._traffic.directive(route.variant))
            try:
                first = await gen.__anext__()
                break
            except BaseException as exc:
                gen.cancel()
                self._verdict(route.variant, exc, None)
                if attempt + 1 < _START_ATTEMPTS and _replica_failed(exc):
                    log.warning("request %s: replica failed before its first token (%r); "
                                "retrying", engine_request.request_id, exc)
                    self._metrics.retries.labels(route.variant, self._replica).inc()
                    await asyncio.sleep(_RETRY_BACKOFF_S[attempt])
                    continue
                if not isinstance(exc, (InvalidRequestError, asyncio.CancelledError)):
                    call.finish(error=True)
                raise
        call.streaming(gen)
        call.observe(first)
        return gen, first, call

    async def _chunks(self, gen, first: Chunk, call: _Call) -> AsyncIterator[Chunk]:
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

    async def _merged(self, started) -> AsyncIterator[tuple[int, Chunk | BaseException]]:
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
            _close_calls(started)

    async def _begin(self, route: Route, engine_requests: list, n: int) -> list:
        """Start every choice (prompt-major, ``n`` per prompt); a prompt's tokens count once."""
        started = []
        try:
            for i, r in enumerate(engine_requests):
                started.append(await self._start(route, r, counts_prompt=i % n == 0))
        except BaseException:
            _close_calls(started)
            raise
        return started

    def _outcome(self, variant: str, endpoint: str, outcome: str,
                 error: HTTPError | None = None) -> None:
        self._metrics.requests.labels(variant, self._replica, endpoint, outcome).inc()
        if error is not None:
            self._metrics.errors.labels(variant, self._replica, error.type,
                                        str(error.code)).inc()
        log.info("request ended: %s", outcome,
                 extra={"variant": variant, "endpoint": endpoint, "outcome": outcome,
                        "error_code": error.code if error is not None else None})

    # -- OpenAI endpoints ---------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, ChatCompletionRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, CompletionRequest, chat=False)

    async def _complete(self, request: Request, model_cls, chat: bool) -> Response:
        arrived = time.time()   # a request's deadline counts from here, not from its replica
        endpoint = "chat" if chat else "completions"
        variant, key, route = self._traffic.table["stable"], "", None
        try:
            self._check_api_key(request)
            body = self._parse(model_cls, await self._read_json(request))
            key = TrafficSplit.request_key(body.user, request.headers.get("x-session-id"))
            route, model = await self._resolve(body.model, key)
            variant = route.variant
            priority, timeout_s = service_class(body, request.headers)
            deadline_at = None if timeout_s is None else arrived + timeout_s
            engine_requests = [r.model_copy(update={"priority": Priority(priority),
                                                    "timeout_s": timeout_s,
                                                    "deadline_at": deadline_at})
                               for r in body.to_engine(model)]
            started = await self._begin(route, engine_requests, body.n)
        except Exception as exc:
            err = to_http_error(exc)
            self._outcome(variant, endpoint, f"http_{err.status}", err)
            return error_response(exc, self._tags(route, key) if route else None)
        meta = {"id": new_id("chatcmpl" if chat else "cmpl"), "created": int(time.time()),
                "model": body.model}
        n_per_prompt = body.n
        if body.stream:
            options = body.stream_options
            include_usage = bool(options and options.include_usage)
            continuous = include_usage and options.continuous_usage_stats
            events = self._stream_events(started, meta, chat, include_usage, continuous,
                                         n_per_prompt, variant, endpoint)
            # Starlette drops a body it never started (the client left before the headers
            # went out): its calls must be let go all the same.
            weakref.finalize(events, _close_calls, started)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **self._tags(route, key)})
        response = await self._whole_response(started, meta, chat, n_per_prompt, variant, endpoint)
        response.headers.update(self._tags(route, key))
        return response

    def _tags(self, route: Route, key: str) -> dict[str, str]:
        """Response headers naming the variant and the feature flags this request got."""
        tags = {"x-mlx-serving-variant": route.variant,
                "x-mlx-serving-routing": f"{self._replica}@{self._traffic.table['version']}"}
        flags = self._traffic.enabled_flags(key, route.variant)
        if flags:
            tags["x-mlx-serving-flags"] = ",".join(flags)
        return tags

    async def _whole_response(self, started, meta, chat, n_per_prompt, variant, endpoint):
        choices = [Choice() for _ in started]
        async for index, item in self._merged(started):
            err = _failure(item)
            if err is not None:
                self._outcome(variant, endpoint, f"http_{err.status}", err)
                return error_response(err)
            choices[index].add(item)
        self._outcome(variant, endpoint, "ok")
        if chat:
            out = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c.logprobs) if c.logprobs else None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
            obj = "chat.completion"
        else:
            out = [{"index": i, "text": c.text,
                    "logprobs": completion_logprobs(c.logprobs, 0) if c.logprobs else None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
            obj = "text_completion"
        return JSONResponse({**meta, "object": obj, "choices": out,
                             "usage": usage(choices, n_per_prompt),
                             "system_fingerprint": None})

    async def _stream_events(self, started, meta, chat, include_usage, continuous, n_per_prompt,
                             variant, endpoint) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        choices = [Choice() for _ in started]
        outcome, error = "cancelled", None
        try:
            if chat:
                for i in range(len(started)):
                    yield sse({**meta, "object": obj, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}]})
            async for index, item in self._merged(started):
                err = _failure(item)
                if err is not None:
                    outcome, error = f"stream_error_{err.code}", err
                    yield sse(err.body())
                    return  # no [DONE] after an error
                choice = choices[index]
                offset = len(choice.text)
                choice.add(item)
                if not (item.text or item.logprobs or item.finished):
                    continue
                finish = item.finish_reason if item.finished else None
                if chat:
                    delta = {"content": item.text} if item.text or not item.finished else {}
                    c = {"index": index, "delta": delta,
                         "logprobs": chat_logprobs(item.logprobs) if item.logprobs else None,
                         "finish_reason": finish}
                else:
                    c = {"index": index, "text": item.text,
                         "logprobs": (completion_logprobs(item.logprobs, offset)
                                      if item.logprobs else None),
                         "finish_reason": finish}
                event = {**meta, "object": obj, "choices": [c]}
                if continuous:   # vLLM's continuous_usage_stats
                    event["usage"] = usage(choices, n_per_prompt)
                yield sse(event)
            if include_usage:
                yield sse({**meta, "object": obj, "choices": [],
                           "usage": usage(choices, n_per_prompt)})
            yield sse("[DONE]")
            outcome = "ok"
        finally:
            self._outcome(variant, endpoint, outcome, error)

    async def routing_state(self) -> dict:
        """This replica's routing table version, long-poll health and circuit breakers
        (handle call)."""
        return {"replica": self._replica, **self._traffic.watch_state(),
                "circuits": {v: b.snapshot() for v, b in self._breakers.items()}}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        try:
            self._check_api_key(request)
            models = await self._catalog.models(self._traffic.table["stable"])
        except Exception as exc:
            return error_response(exc)
        cards = [ModelCard(id=m["id"], max_model_len=m["max_model_len"]) for m in models]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def _variant_for(self, model: str | None) -> tuple[str, str | None]:
        """Tokenizer requests go to the stable variant."""
        stable = self._traffic.table["stable"]
        if model is not None and model not in await self._catalog.require(stable):
            raise HTTPError(404, f"the model {model!r} does not exist", type="not_found_error",
                            param="model", code="model_not_found")
        return stable, model

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        try:
            self._check_api_key(request)
            body = self._parse(TokenizeRequest, await self._read_json(request))
            variant, model = await self._variant_for(body.model)
            messages = ([{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
                        if body.messages is not None else None)
            tokens = await self._servers[variant].tokenize.remote(
                model, body.prompt, messages, body.add_special_tokens)
            return JSONResponse({"tokens": tokens, "count": len(tokens)})
        except Exception as exc:
            return error_response(exc)

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        try:
            self._check_api_key(request)
            body = self._parse(DetokenizeRequest, await self._read_json(request))
            variant, model = await self._variant_for(body.model)
            text = await self._servers[variant].detokenize.remote(model, body.tokens)
            return JSONResponse({"prompt": text})
        except Exception as exc:
            return error_response(exc)

    # -- operations ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready(self) -> Response:
        try:
            ok = await asyncio.wait_for(
                self._servers[self._traffic.table["stable"]].ready.remote(), timeout=10)
        except Exception as exc:
            return JSONResponse({"status": "not ready", "reason": repr(exc)}, status_code=503)
        return JSONResponse({"status": "ready" if ok else "not ready"},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        if self._telemetry is None:
            from prometheus_client import generate_latest
            text = generate_latest(self._metrics.registry).decode()
        else:
            text = await self._telemetry.metrics_text.remote()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/admin/qos")
    async def admin_qos(self, request: Request) -> Response:
        """The QoS monitor's SLOs, violations and directives, and this Router's circuits."""
        response = await self._admin(request, "qos")
        if response.status_code == 200:
            body = json.loads(response.body)
            body["circuits"] = {"router": self._replica,
                                **{v: b.snapshot() for v, b in self._breakers.items()}}
            response = JSONResponse(body)
        return response

    @app.get("/admin/streams")
    async def admin_streams(self, request: Request) -> Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        if self._telemetry is None:
            streams = self._stream_views()
        else:
            streams = await self._telemetry.streams.remote()
        return JSONResponse({"streams": streams, "count": len(streams)})

    @app.get("/admin/routing")
    async def admin_routing(self, request: Request) -> Response:
        """How this Router sees each variant's replicas: the queue length its request router
        holds for each (null for a variant set to Serve's own router, which keeps no view)."""
        if (refused := self._refusal(request)) is not None:
            return refused
        views = routing_views()
        return JSONResponse({"router": self._replica, "variants": {
            variant: views.get(handle.deployment_name)
            for variant, handle in self._servers.items()}})

    # -- canary rollouts (operators) ----------------------------------------------------------------
    async def _admin(self, request: Request, method: str, *args, **kwargs) -> Response:
        """Check the operator token, then run a command on the RolloutController."""
        if (refused := self._refusal(request)) is not None:
            return refused
        return await self._admin_call(method, *args, **kwargs)

    async def _admin_call(self, method: str, *args, **kwargs) -> Response:
        """Run an operator command (token already checked) and answer with its result."""
        try:
            if self._controller is None:
                raise HTTPError(404, "this application has no rollout controller",
                                type="not_found_error", code="no_controller")
            result = await getattr(self._controller, method).remote(*args, **kwargs)
            await self._traffic.refresh()
            if isinstance(result, dict) and "routing" in result:
                result["router"] = {"replica": self._replica,
                                    "routing_version": self._traffic.table["version"]}
            return JSONResponse(result)
        except Exception as exc:
            return error_response(exc)

    async def _operator_body(self, request: Request) -> dict:
        """Check the operator token, then read the command's JSON object (empty: {})."""
        self._check_operator(request)
        body = await self._read_json(request, empty={})
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        return body

    @app.get("/admin/canary/status")
    async def canary_status(self, request: Request) -> Response:
        return await self._admin(request, "status")

    @app.get("/admin/canary/history")
    async def canary_history(self, request: Request, limit: int = 50) -> Response:
        return await self._admin(request, "history", limit)

    @app.post("/admin/canary/{action}")
    async def canary_command(self, request: Request, action: str) -> Response:
        try:
            body = await self._operator_body(request)
        except HTTPError as err:
            return error_response(err)
        if action == "start":
            if not isinstance(body.get("variant"), str):
                return error_response(bad_request("variant: required", "variant"))
            return await self._admin_call("start", body["variant"], body.get("plan"))
        if action == "promote":
            return await self._admin_call("promote", bool(body.get("full", False)))
        if action in ("pause", "rollback"):
            return await self._admin_call(action, str(body.get("reason") or "operator"))
        if action == "resume":
            return await self._admin_call("resume")
        return error_response(HTTPError(404, f"unknown canary action {action!r}",
                                        type="not_found_error", param="action",
                                        code="unknown_action"))

    @app.get("/admin/flags")
    async def flags(self, request: Request) -> Response:
        return await self._admin(request, "flags")

    @app.put("/admin/flags/{name}")
    async def set_flag(self, request: Request, name: str) -> Response:
        try:
            body = await self._operator_body(request)
        except HTTPError as err:
            return error_response(err)
        return await self._admin_call("set_flag", {**body, "name": name})

    @app.delete("/admin/flags/{name}")
    async def delete_flag(self, request: Request, name: str) -> Response:
        return await self._admin(request, "delete_flag", name)

    def __del__(self):
        self._traffic.stop()
        if self._reporter is not None:
            self._reporter.stop()
