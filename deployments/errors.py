"""The one place where failures become HTTP statuses and OpenAI-shaped error bodies."""

from __future__ import annotations

import logging

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from mlx_serving.engine.errors import (
    ContextLengthExceededError,
    DeadlineExceededError,
    EngineClosedError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    QueueFullError,
    ReaderStalledError,
)

log = logging.getLogger(__name__)


class HTTPError(Exception):
    """An error the Router answers with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.retry_after = param, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> HTTPError:
    return HTTPError(400, message, type="invalid_request_error", param=param, code=code)


def to_http_error(exc: BaseException) -> HTTPError:
    """Map any exception to the HTTPError the client should see."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, ContextLengthExceededError):
        return bad_request(exc.message, exc.param, exc.code)
    if isinstance(exc, InvalidRequestError):
        return bad_request(exc.message, exc.param, exc.code)
    if isinstance(exc, ModelNotFoundError):
        return HTTPError(404, exc.message, type="not_found_error", param=exc.param or "model",
                         code=exc.code)
    if isinstance(exc, QueueFullError):
        return HTTPError(429, exc.message, type="rate_limit_error", code=exc.code,
                         retry_after=exc.retry_after)
    if isinstance(exc, DeadlineExceededError):
        return HTTPError(504, exc.message, type="timeout_error", param="timeout_s", code=exc.code)
    if isinstance(exc, BackPressureError):
        return HTTPError(503, "the service is at capacity; retry shortly", type="overloaded_error",
                         code="overloaded", retry_after=getattr(exc, "retry_after_s", None) or 1.0)
    if isinstance(exc, (EngineClosedError, DeploymentUnavailableError)):
        return HTTPError(503, str(exc) or "the model server is unavailable",
                         type="service_unavailable_error", code="unavailable", retry_after=1.0)
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return HTTPError(503, "the model server replica serving this request failed",
                         type="service_unavailable_error", code="replica_failed", retry_after=1.0)
    if isinstance(exc, (ModelLoadError, EngineError)):
        return HTTPError(500, exc.message, type="server_error", code=exc.code)
    log.exception("unexpected error", exc_info=exc)
    return HTTPError(500, f"internal error: {type(exc).__name__}", type="server_error",
                     code="internal_error")


# Errors that end a request after the replica accepted it travel as codes in its last chunk.
_ENDED_BY = {DeadlineExceededError.code: DeadlineExceededError,
             EngineClosedError.code: EngineClosedError,
             ReaderStalledError.code: ReaderStalledError}


def ended_with_error(message: str | None, code: str | None) -> HTTPError:
    """The HTTP error for a request the engine ended with ``code`` after accepting it."""
    cls = _ENDED_BY.get(code or "")
    if cls is not None:
        return to_http_error(cls(message or code))
    return HTTPError(500, message or "generation failed", type="server_error",
                     code=code or "engine_error")
