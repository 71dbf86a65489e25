"""The messages between ``EngineProcess`` and its child, pickled over one duplex pipe.

    parent -> child  Submit(call_id, request)   validate (Engine.submit) and queue; a Reply
                     GetStats(call_id)          a Reply holding EngineStats
                     SetAdmission(call_id, scale, shed_batch)
                                                a Reply holding the new AdmissionSettings
                     GetAdmission(call_id)      a Reply holding AdmissionSettings
                     Cancel(request_id)
                     Reads({request_id: n})     tokens the callers read, per stream in steps of
                                                a quarter of stream_buffer_tokens; at most one
                                                message per turn of a caller's event loop
                     Shutdown(drain_timeout_s)
    child -> parent  Ready(models | error)      once, when the models are loaded
                     Reply(call_id, value, error)
                     Deltas([...])              every delta of one engine loop turn, all streams
                     Heartbeat(healthy)         every second
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_serving.engine.errors import EngineError
from mlx_serving.engine.model import ModelInfo
from mlx_serving.engine.outputs import RequestOutput
from mlx_serving.engine.params import GenerationRequest


@dataclass
class Submit:
    call_id: int
    request: GenerationRequest


@dataclass
class GetStats:
    call_id: int


@dataclass
class SetAdmission:
    call_id: int
    scale: float | None = None        # None keeps the current value
    shed_batch: bool | None = None


@dataclass
class GetAdmission:
    call_id: int


@dataclass
class Cancel:
    request_id: str


@dataclass
class Reads:
    tokens: dict[str, int]   # request id -> tokens read since the last report


@dataclass
class Shutdown:
    drain_timeout_s: float


@dataclass
class Ready:
    models: list[ModelInfo]
    error: EngineError | None = None


@dataclass
class Reply:
    call_id: int
    value: Any = None
    error: EngineError | None = None


@dataclass
class Deltas:
    items: list   # encode_delta's output


@dataclass
class Heartbeat:
    healthy: bool


def encode_delta(delta: RequestOutput):
    """The delta as it crosses the pipe; ``decode_delta`` rebuilds it."""
    # Pickling a slotted dataclass costs ~15x a tuple (6 against 0.4 us a delta): plain
    # token deltas, nearly all of them, cross as (request_id, text, token_ids).
    if delta.logprobs is None and not delta.finished:
        return delta.request_id, delta.text, delta.token_ids
    return delta


def decode_delta(item) -> RequestOutput:
    return RequestOutput(*item) if isinstance(item, tuple) else item


def portable_error(exc: BaseException) -> EngineError:
    """The error to send across: the engine's own as is, anything else (a bug) as EngineError."""
    if isinstance(exc, EngineError):
        return exc
    return EngineError(f"{type(exc).__name__}: {exc}")
