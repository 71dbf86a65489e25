"""The Router: the application's HTTP ingress (FastAPI through ``@serve.ingress``).

It checks requests (request_checks.py), picks the variant, has the Dispatcher run them on
the variant's LLMServer replicas (dispatch.py), and answers in OpenAI's JSON or SSE; it also
serves the models, tokenizer, health, metrics and operators' admin endpoints.
"""


import asyncio
import json
import logging
import os
import time
import weakref
from typing import AsyncIterator

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from mlx_serving.deployments.catalog import ModelCatalog
from mlx_serving.deployments.dispatch import Dispatcher, close_calls
from mlx_serving.deployments.errors import HTTPError, bad_request, ended_with_error, to_http_error
from mlx_serving.deployments import openapi
from mlx_serving.deployments.openai_format import (
    Choice, chat_logprobs, completion_logprobs, sse, usage)
from mlx_serving.deployments.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList,
    TokenizeRequest, new_id)
from mlx_serving.deployments.replica_routing import routing_views
from mlx_serving.deployments.request_checks import Credentials, parse, read_json, service_class
from mlx_serving.deployments.router_metrics import RouterMetrics
from mlx_serving.deployments.settings import AppConfig
from mlx_serving.deployments.telemetry import Reporter, replica_id, route_logs_to_serve
from mlx_serving.deployments.traffic import Route, TrafficSplit
from mlx_serving.deployments.wire import Chunk
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
        token = ((self.config.operator_token and self.config.operator_token.get_secret_value())
                 or os.environ.get("MLX_SERVING_OPERATOR_TOKEN"))
        self._credentials = Credentials(
            [s.get_secret_value() for s in self.config.api_keys] + env_keys, token)
        self._replica = replica_id()
        self._metrics = RouterMetrics(self._replica)
        self._dispatch = Dispatcher(servers, self._traffic, self._metrics, self._replica,
                                    self.config.circuit_breaker)
        self._catalog = ModelCatalog(servers)
        self._reporter = None
        if telemetry is not None:
            self._reporter = Reporter(telemetry, f"router:{self._replica}", self._metrics.registry,
                                      self._dispatch.stream_views).start()

    def _refusal(self, request: Request) -> Response | None:
        """The error response for a request without the operator token; None with it."""
        try:
            self._credentials.check_operator(request)
        except HTTPError as err:
            return error_response(err)
        return None

    async def _body(self, request: Request, model_cls):
        """The request's body as ``model_cls``, within the configured size."""
        return parse(model_cls, await read_json(request, self.config.max_body_bytes))

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
            self._credentials.check_client(request)
            body = await self._body(request, model_cls)
            key = TrafficSplit.request_key(body.user, request.headers.get("x-session-id"))
            route, model = await self._resolve(body.model, key)
            variant = route.variant
            priority, timeout_s = service_class(body, request.headers)
            deadline_at = None if timeout_s is None else arrived + timeout_s
            engine_requests = [r.model_copy(update={"priority": Priority(priority),
                                                    "timeout_s": timeout_s,
                                                    "deadline_at": deadline_at})
                               for r in body.to_engine(model)]
            started = await self._dispatch.begin(route, engine_requests, body.n)
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
            weakref.finalize(events, close_calls, started)
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
        async for index, item in self._dispatch.merged(started):
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
            async for index, item in self._dispatch.merged(started):
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
                "circuits": self._dispatch.circuits()}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        try:
            self._credentials.check_client(request)
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
            self._credentials.check_client(request)
            body = await self._body(request, TokenizeRequest)
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
            self._credentials.check_client(request)
            body = await self._body(request, DetokenizeRequest)
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
                                **self._dispatch.circuits()}
            response = JSONResponse(body)
        return response

    @app.get("/admin/streams")
    async def admin_streams(self, request: Request) -> Response:
        if (refused := self._refusal(request)) is not None:
            return refused
        if self._telemetry is None:
            streams = self._dispatch.stream_views()
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
        self._credentials.check_operator(request)
        body = await read_json(request, self.config.max_body_bytes, empty={})
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
