"""One request's life inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from mlx_serving.engine.params import GenerationRequest
from mlx_serving.engine.stream import RequestStream


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued, not yet admitted
    RUNNING = "running"    # in the BatchGenerator
    PAUSED = "paused"      # out of the batch (reader lags), KV cache kept
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Engine-internal state of one request. Touched only by the engine thread after submit."""

    request: GenerationRequest
    model_name: str
    prompt_ids: list[int]
    max_tokens: int
    stream: RequestStream
    kv_bytes: int                      # KV memory reserved for prompt + max_tokens
    detokenizer: Any = None            # IncrementalDetokenizer, built on admission
    stop_matcher: Any = None           # StopStringMatcher or None
    status: SequenceStatus = SequenceStatus.WAITING
    uid: int | None = None             # BatchGenerator uid while RUNNING
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    paused_cache: list | None = None   # KV cache held while PAUSED
    paused_at: float = 0.0
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self):
        return self.request.params

    @property
    def remaining_tokens(self) -> int:
        return self.max_tokens - len(self.generated)
