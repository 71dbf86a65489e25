"""What the Router checks of an HTTP request before anything reaches a variant: its
credentials (API keys, the operator token), its body (size, JSON, schema) and its service
class (priority and deadline). Every failure raises ``HTTPError`` naming what is wrong.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from mlx_serving.deployments.errors import HTTPError, bad_request


class Credentials:
    """The API keys a client must present (none: open) and the operator token of the admin
    API (none: the admin API is off), both as ``Authorization: Bearer ...``."""

    def __init__(self, api_keys: list[str], operator_token: str | None):
        self._api_keys = [k.encode() for k in api_keys]
        self._operator_token = operator_token.encode() if operator_token else None

    def check_client(self, request: Request) -> None:
        if not self._api_keys:
            return
        given = _bearer(request)
        if given is None or not any(hmac.compare_digest(given, k) for k in self._api_keys):
            raise HTTPError(401, "missing or invalid API key (Authorization: Bearer ...)",
                            type="authentication_error", code="invalid_api_key")

    def check_operator(self, request: Request) -> None:
        if self._operator_token is None:
            raise HTTPError(403, "the admin API is disabled: no operator token is configured",
                            type="permission_error", code="admin_disabled")
        given = _bearer(request)
        if given is None:
            raise HTTPError(401, "operator token required (Authorization: Bearer ...)",
                            type="authentication_error", code="missing_operator_token")
        if not hmac.compare_digest(given, self._operator_token):
            raise HTTPError(403, "wrong operator token", type="permission_error",
                            code="invalid_operator_token")


def _bearer(request: Request) -> bytes | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip().encode() if auth.lower().startswith("bearer ") else None


async def read_json(request: Request, limit: int, empty: Any = None) -> Any:
    """The body as JSON, within ``limit`` bytes; ``empty`` (if given) for an empty body."""
    def too_large() -> HTTPError:
        return HTTPError(413, f"request body exceeds {limit} bytes",
                         type="invalid_request_error", code="body_too_large")

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large()
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large()
    if not body and empty is not None:
        return empty
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the body is nested too deeply", code="invalid_json") from None


def parse(model_cls: type[BaseModel], body: Any):
    """``body`` as ``model_cls``; the first validation error names its field."""
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
