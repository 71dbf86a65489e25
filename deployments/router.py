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
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError
from ray import serve

from mlx_serving.deployments.errors import HTTPError, bad_request, to_http_error
from mlx_serving.deployments.openai_format import (
    Choice, chat_logprobs, completion_logprobs, sse, usage)
from mlx_serving.deployments.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList,
    TokenizeRequest, new_id)
from mlx_serving.deployments.settings import AppConfig
from mlx_serving.deployments.telemetry import Reporter, replica_id
from mlx_serving.deployments.wire import Chunk

log = logging.getLogger(__name__)

app = FastAPI(title="mlx-serving", description="OpenAI-compatible LLM serving on MLX and Ray Serve.")

_MODELS_TTL_S = 5.0
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


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


class _Metrics:
    """The Router replica's own metrics (merged application-wide by Telemetry)."""

    def __init__(self, replica: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["variant", "replica"]
        self.requests = Counter("mlx_serving:requests", "Requests finished, by outcome.",
                                labels + ["endpoint", "outcome"], registry=r)
        self.ttft = Histogram("mlx_serving:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mlx_serving:inter_token_latency_seconds",
                             "Time between tokens (per chunk: gap / tokens in it).",
                             labels, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("mlx_serving:e2e_request_latency_seconds", "Request latency.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("mlx_serving:prompt_tokens", "Prompt tokens.", labels,
                                     registry=r)
        self.generation_tokens = Counter("mlx_serving:generation_tokens", "Generated tokens.",
                                         labels, registry=r)
        self.active = Gauge("mlx_serving:router_active_streams", "Streams being served.",
                            ["replica"], registry=r)
        self.replica = replica


class _Call:
    """One engine request on its way through an LLMServer: timing, metrics, admin view."""

    def __init__(self, router: "Router", variant: str, stream: ActiveStream, started: float):
        self.router, self.variant, self.stream = router, variant, stream
        self.started = started
        self.last = None

    def observe(self, chunk: Chunk) -> None:
        now = time.perf_counter()
        m, labels = self.router._metrics, (self.variant, self.router._replica)
        if chunk.replica:
            self.stream.replica = chunk.replica
        if chunk.num_tokens:
            if self.last is None:
                m.ttft.labels(*labels).observe(now - self.started)
            else:
                m.itl.labels(*labels).observe((now - self.last) / chunk.num_tokens)
            self.last = now
            self.stream.tokens += chunk.num_tokens
        if chunk.finished:
            m.e2e.labels(*labels).observe(now - self.started)
            m.prompt_tokens.labels(*labels).inc(chunk.prompt_tokens)
            m.generation_tokens.labels(*labels).inc(chunk.completion_tokens)


@serve.deployment(name="Router", num_replicas=2, max_ongoing_requests=512,
                  ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Router:
    """OpenAI-compatible ingress in front of the variants' LLMServer deployments."""

    def __init__(self, config: dict, servers: dict, telemetry=None):
        self.config = AppConfig.model_validate(config)
        self._servers = servers
        self._telemetry = telemetry
        env_keys = [k for k in os.environ.get("MLX_SERVING_API_KEYS", "").split(",") if k]
        self._api_keys = [k.encode() for k in self.config.api_keys + env_keys]
        token = self.config.operator_token or os.environ.get("MLX_SERVING_OPERATOR_TOKEN")
        self._operator_token = token.encode() if token else None
        self._replica = replica_id()
        self._metrics = _Metrics(self._replica)
        self._active: dict[str, ActiveStream] = {}
        self._models: dict[str, tuple[float, list[dict]]] = {}
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

    async def _read_json(self, request: Request) -> Any:
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

    async def _served_models(self, variant: str) -> list[dict]:
        at, models = self._models.get(variant, (0.0, []))
        if time.monotonic() - at > _MODELS_TTL_S or not models:
            models = await self._servers[variant].models.remote()
            self._models[variant] = (time.monotonic(), models)
        return models

    async def _resolve(self, model: str) -> tuple[str, str]:
        """(variant, model name) serving the requested model."""
        variant = self.config.stable
        names = [m["id"] for m in await self._served_models(variant)]
        if model not in names:
            raise HTTPError(404, f"the model {model!r} does not exist; served: {names}",
                            type="not_found_error", param="model", code="model_not_found")
        return variant, model

    async def _start(self, variant: str, engine_request) -> tuple[Any, Chunk, _Call]:
        """Send one engine request; returns its stream and first chunk (errors raise here)."""
        handle = self._servers[variant].options(stream=True)
        stream = ActiveStream(engine_request.request_id, variant, engine_request.model)
        call = _Call(self, variant, stream, time.perf_counter())
        gen = handle.generate.remote(engine_request)
        try:
            first = await gen.__anext__()
        except BaseException:
            gen.cancel()
            raise
        self._active[stream.request_id] = stream
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
        finally:
            gen.cancel()
            self._active.pop(call.stream.request_id, None)

    async def _merged(self, started) -> AsyncIterator[tuple[int, Chunk | BaseException]]:
        """Chunks of several choices as they come, tagged with the choice index."""
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
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                yield index, item
                if isinstance(item, BaseException) or item.finished:
                    remaining -= 1
        finally:
            for t in tasks:
                t.cancel()

    async def _begin(self, variant: str, engine_requests: list) -> list:
        started = []
        try:
            for r in engine_requests:
                started.append(await self._start(variant, r))
        except BaseException:
            for gen, _, call in started:
                gen.cancel()
                self._active.pop(call.stream.request_id, None)
            raise
        return started

    def _outcome(self, variant: str, endpoint: str, outcome: str) -> None:
        self._metrics.requests.labels(variant, self._replica, endpoint, outcome).inc()

    # -- OpenAI endpoints ---------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, ChatCompletionRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, CompletionRequest, chat=False)

    async def _complete(self, request: Request, model_cls, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        variant = self.config.stable
        try:
            self._check_api_key(request)
            body = self._parse(model_cls, await self._read_json(request))
            variant, model = await self._resolve(body.model)
            engine_requests = body.to_engine(model)
            started = await self._begin(variant, engine_requests)
        except Exception as exc:
            err = to_http_error(exc)
            self._outcome(variant, endpoint, f"http_{err.status}")
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers())
        meta = {"id": new_id("chatcmpl" if chat else "cmpl"), "created": int(time.time()),
                "model": body.model}
        n_per_prompt = body.n
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream_events(started, meta, chat, include_usage, n_per_prompt,
                                         variant, endpoint)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole_response(started, meta, chat, n_per_prompt, variant, endpoint)

    async def _whole_response(self, started, meta, chat, n_per_prompt, variant, endpoint):
        choices = [Choice() for _ in started]
        async for index, item in self._merged(started):
            if isinstance(item, BaseException) or item.finish_reason == "error":
                err = to_http_error(item) if isinstance(item, BaseException) else HTTPError(
                    500, item.error or "generation failed", type="server_error",
                    code=item.error_code)
                self._outcome(variant, endpoint, f"http_{err.status}")
                return JSONResponse(err.body(), status_code=err.status, headers=err.headers())
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

    async def _stream_events(self, started, meta, chat, include_usage, n_per_prompt, variant,
                             endpoint) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        choices = [Choice() for _ in started]
        outcome = "cancelled"
        try:
            if chat:
                for i in range(len(started)):
                    yield sse({**meta, "object": obj, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}]})
            async for index, item in self._merged(started):
                if isinstance(item, BaseException) or item.finish_reason == "error":
                    err = (to_http_error(item) if isinstance(item, BaseException) else HTTPError(
                        500, item.error or "generation failed", type="server_error",
                        code=item.error_code))
                    outcome = f"stream_error_{err.code}"
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
                yield sse({**meta, "object": obj, "choices": [c]})
            if include_usage:
                yield sse({**meta, "object": obj, "choices": [],
                           "usage": usage(choices, n_per_prompt)})
            yield sse("[DONE]")
            outcome = "ok"
        finally:
            self._outcome(variant, endpoint, outcome)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        try:
            self._check_api_key(request)
            models = await self._served_models(self.config.stable)
        except Exception as exc:
            err = to_http_error(exc)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers())
        cards = [ModelCard(id=m["id"], max_model_len=m["max_model_len"]) for m in models]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        try:
            self._check_api_key(request)
            body = self._parse(TokenizeRequest, await self._read_json(request))
            variant, model = await self._resolve(body.model) if body.model else (
                self.config.stable, None)
            messages = ([{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
                        if body.messages is not None else None)
            tokens = await self._servers[variant].tokenize.remote(
                model, body.prompt, messages, body.add_special_tokens)
            return JSONResponse({"tokens": tokens, "count": len(tokens)})
        except Exception as exc:
            err = to_http_error(exc)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        try:
            self._check_api_key(request)
            body = self._parse(DetokenizeRequest, await self._read_json(request))
            variant, model = await self._resolve(body.model) if body.model else (
                self.config.stable, None)
            text = await self._servers[variant].detokenize.remote(model, body.tokens)
            return JSONResponse({"prompt": text})
        except Exception as exc:
            err = to_http_error(exc)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    # -- operations ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready(self) -> Response:
        try:
            ok = await asyncio.wait_for(
                self._servers[self.config.stable].ready.remote(), timeout=10)
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

    @app.get("/admin/streams")
    async def admin_streams(self, request: Request) -> Response:
        try:
            self._check_operator(request)
        except HTTPError as err:
            return JSONResponse(err.body(), status_code=err.status)
        if self._telemetry is None:
            streams = self._stream_views()
        else:
            streams = await self._telemetry.streams.remote()
        return JSONResponse({"streams": streams, "count": len(streams)})

    def __del__(self):
        if self._reporter is not None:
            self._reporter.stop()
