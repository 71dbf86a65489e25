"""The Router's OpenAPI document (``/openapi.json``).

The Router's endpoints read the raw request (to bound the body and word the errors), so
FastAPI sees no request bodies. This module adds them from the pydantic models of
``deployments/protocol.py``, with the model names the application serves, the answers
(OpenAI's error body for every refusal) and bearer security where API keys apply. The
document describes what the server accepts: a request valid by it gets a 2xx, except for
what a schema cannot state (prompt tokens + max_tokens within the model's context, token
ids below its vocabulary size, prompts × n within MAX_CHOICES), which the descriptions say.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from ray import serve

from mlx_serving.deployments.protocol import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, DetokenizeRequest,
    DetokenizeResponse, ErrorResponse, ModelList, TokenizeRequest, TokenizeResponse)
from mlx_serving.deployments.settings import AppConfig

_REF = "#/components/schemas/{model}"

_ERRORS = {
    400: "The request is invalid; error.param names the field, error.code the rule.",
    401: "Missing or wrong API key.",
    404: "The model does not exist (error.param: model).",
    413: "The body is larger than max_body_bytes.",
    429: "The engine's queue is full, or batch-class requests are being shed; retry after "
         "Retry-After seconds.",
    503: "The service is at capacity or a replica failed; retry after Retry-After seconds.",
    504: "The request's deadline (timeout_s) passed.",
}

# path -> (request body, 200 answer, streams, error statuses)
_BODIES: dict[str, tuple[type[BaseModel], type[BaseModel], bool, tuple[int, ...]]] = {
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletion, True,
                             (400, 404, 413, 429, 503, 504)),
    "/v1/completions": (CompletionRequest, Completion, True, (400, 404, 413, 429, 503, 504)),
    "/tokenize": (TokenizeRequest, TokenizeResponse, False, (400, 404, 413, 503)),
    "/detokenize": (DetokenizeRequest, DetokenizeResponse, False, (400, 404, 413, 503)),
}

_HEADERS = [
    {"name": "X-Session-Id", "in": "header", "required": False,
     "description": "Sticky routing key when the body sets no user.",
     "schema": {"type": "string"}},
]


# One server-sent event (Open API 3.1: a text/event-stream schema describes each event).
_SSE_EVENT = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string"}},
    "description": "With stream: true. Each event's data is a chunk object (JSON), an error "
                   "body that ends the stream, or the final [DONE].",
}


def served_model_names(config: AppConfig) -> list[str]:
    """Names every variant serves, in the stable variant's order: a request for one of them
    is served whichever variant takes it (or becomes stable)."""
    names = [m.name for m in config.variants[config.stable].engine.models]
    common = [n for n in names
              if all(n in {m.name for m in v.engine.models} for v in config.variants.values())]
    return common or names


def api_keys_configured(config: AppConfig) -> bool:
    """Whether clients must send a key (the config's or MLX_SERVING_API_KEYS, as the Router)."""
    env_keys = [k for k in os.environ.get("MLX_SERVING_API_KEYS", "").split(",") if k]
    return bool(config.api_keys or env_keys)


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": _REF.format(model=model.__name__)}


def _component_schemas(names: list[str]) -> dict[str, Any]:
    """The request and answer models as JSON Schema, ``model`` narrowed to ``names``."""
    models = [(m, "validation") for m, *_ in _BODIES.values()]
    models += [(m, "serialization") for _, m, *_ in _BODIES.values()]
    models += [(ErrorResponse, "serialization"), (ModelList, "serialization")]
    _, top = models_json_schema(models, ref_template=_REF)
    schemas = top["$defs"]
    enum = {"type": "string", "enum": names}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        schemas[name]["properties"]["model"] = enum
    for name in ("TokenizeRequest", "DetokenizeRequest"):
        schemas[name]["properties"]["model"] = (
            enum if len(names) > 1 else {"anyOf": [enum, {"type": "null"}]})
        if len(names) > 1:  # None means "the only model"
            schemas[name].setdefault("required", []).append("model")
    return schemas


def _operation(path: str, auth: bool) -> dict:
    body, answer, streams, errors = _BODIES[path]
    ok = _json(_ref(answer))
    if streams:
        ok["text/event-stream"] = {"schema": _SSE_EVENT}
    statuses = sorted(errors + ((401,) if auth else ()))
    responses = {"200": {"description": "OK", "content": ok}}
    responses.update({str(s): {"description": _ERRORS[s], "content": _json(_ref(ErrorResponse))}
                      for s in statuses})
    op = {"requestBody": {"required": True, "content": _json(_ref(body))},
          "responses": responses}
    if streams:
        op["parameters"] = _HEADERS
    return op


def openapi_schema(app: FastAPI, config: AppConfig, auth: bool) -> dict:
    """The document for ``app`` serving ``config``; ``auth``: the API takes bearer keys."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {}).update(_component_schemas(served_model_names(config)))
    components["securitySchemes"] = {
        "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key."},
        "operatorToken": {"type": "http", "scheme": "bearer",
                          "description": "The operator token (admin API)."}}
    paths = doc["paths"]
    for path in _BODIES:
        paths[path]["post"].update(_operation(path, auth))
    _document_other_answers(paths, auth)
    for path, item in paths.items():
        for op in item.values():
            if path.startswith("/admin/"):
                op["security"] = [{"operatorToken": []}]
            elif auth and (path in _BODIES or path == "/v1/models"):
                op["security"] = [{"apiKey": []}]
    return doc


def _document_other_answers(paths: dict, auth: bool) -> None:
    """What FastAPI cannot see of the answers of the endpoints without a request body."""
    def error(description: str) -> dict:
        return {"description": description, "content": _json(_ref(ErrorResponse))}

    models = paths["/v1/models"]["get"]["responses"]
    models["200"] = {"description": "OK", "content": _json(_ref(ModelList))}
    models["503"] = error(_ERRORS[503])
    if auth:
        models["401"] = error(_ERRORS[401])
    paths["/ready"]["get"]["responses"]["503"] = {"description": "Not ready."}
    paths["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text format.",
        "content": {"text/plain": {"schema": {"type": "string"}}}}
    for path, item in paths.items():
        if path.startswith("/admin/"):
            for op in item.values():
                op["responses"].update({
                    "400": error("The command's body is invalid."),
                    "401": error("No operator token."),
                    "403": error("Wrong operator token, or the admin API is disabled."),
                    "404": error("Unknown action or flag, or no rollout controller.")})


class ServedOpenAPI:
    """``app.openapi`` of the Router: the document for the config of the replica serving it.

    Set on the FastAPI app before ``@serve.ingress`` copies it, so each replica's copy
    carries one; the config is read from the replica's Router when first asked.
    """

    def __init__(self, app: FastAPI):
        self.app = app
        self._doc: dict | None = None

    def __call__(self) -> dict:
        if self._doc is None:
            config = serve.get_replica_context().servable_object.config
            self._doc = openapi_schema(self.app, config, api_keys_configured(config))
        return self._doc


def install(app: FastAPI) -> None:
    """Serve this module's document at the app's ``/openapi.json``."""
    app.openapi = ServedOpenAPI(app)
