"""Admission control: the bounds on the engine's queue, and the knobs a QoS policy turns live.

Every submission passes ``AdmissionControl.reserve`` before it is queued. The queue is
bounded three ways: queued requests, their prompt tokens, and the KV memory they will
reserve once admitted. A live ``scale`` multiplies every bound, and ``shed_batch`` refuses
batch-class requests outright. A refusal carries a Retry-After estimated from how fast
queued work has recently left the queue for the batch.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.errors import InvalidRequestError, LoadShedError, QueueFullError
from mlx_serving.engine.params import Priority

MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 60.0
RATE_WINDOW_S = 30.0       # the admission rate is measured over this much recent history
_RATE_MAX_EVENTS = 4096    # and over at most this many admissions
_RATE_MIN_SPAN_S = 1.0     # a burst admitted at once is not a rate


class QueueLimit(str, enum.Enum):
    """The bound a refused request hit."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    KV_MEMORY = "kv_memory"
    SHED_BATCH = "shed_batch"


@dataclass(frozen=True)
class AdmissionSettings:
    """The live settings a QoS policy turns (``Engine.set_admission``)."""

    scale: float = 1.0        # multiplies every queue bound; 0 < scale <= 1
    shed_batch: bool = False  # refuse batch-class requests with LoadShedError

    def __post_init__(self):
        if not 0 < self.scale <= 1:
            raise InvalidRequestError(f"scale: must lie in (0, 1], got {self.scale}",
                                      param="scale")


@dataclass(frozen=True)
class QueueBounds:
    """The queue's bounds after scaling."""

    requests: int
    tokens: int
    kv_bytes: int


@dataclass
class QueuedWork:
    """What the queued (submitted, not yet admitted) requests add up to."""

    requests: int = 0
    tokens: int = 0     # prompt tokens
    kv_bytes: int = 0   # KV memory they reserve once admitted
    batch: int = 0      # batch-class requests


class _AdmissionRate:
    """Requests, prompt tokens and KV bytes that left the queue for the batch, recently."""

    def __init__(self):
        self._events: deque[tuple[float, int, int]] = deque()  # (when, tokens, kv_bytes)
        self._tokens = 0
        self._kv_bytes = 0

    def record(self, tokens: int, kv_bytes: int) -> None:
        now = time.monotonic()
        self._events.append((now, tokens, kv_bytes))
        self._tokens += tokens
        self._kv_bytes += kv_bytes
        self._forget(now)

    def _forget(self, now: float) -> None:
        events = self._events
        while events and (now - events[0][0] > RATE_WINDOW_S or len(events) > _RATE_MAX_EVENTS):
            _, tokens, kv_bytes = events.popleft()
            self._tokens -= tokens
            self._kv_bytes -= kv_bytes

    def per_second(self, limit: QueueLimit) -> float:
        """The recent rate of the quantity ``limit`` bounds; 0.0 when nothing left lately."""
        now = time.monotonic()
        self._forget(now)
        if not self._events:
            return 0.0
        amount = {QueueLimit.TOKENS: self._tokens,
                  QueueLimit.KV_MEMORY: self._kv_bytes}.get(limit, len(self._events))
        return amount / max(now - self._events[0][0], _RATE_MIN_SPAN_S)


class AdmissionControl:
    """Decides whether a submission may join the queue; thread-safe.

    A request that alone exceeds the token or KV bound is still queued when the queue is
    empty, so that every request the engine can serve is eventually served.
    """

    def __init__(self, config: EngineConfig, kv_budget_bytes: int):
        self._max_requests = config.max_waiting_requests
        self._max_tokens = config.max_waiting_tokens
        self._max_kv_bytes = int(config.max_waiting_kv_fraction * kv_budget_bytes)
        self._settings = AdmissionSettings()
        self._queued = QueuedWork()
        self._rate = _AdmissionRate()
        self._lock = threading.Lock()
        self.rejected = 0   # refusals, load shedding included

    # -- settings ----------------------------------------------------------------------------------
    @property
    def settings(self) -> AdmissionSettings:
        return self._settings

    def update(self, scale: float | None = None,
               shed_batch: bool | None = None) -> AdmissionSettings:
        """Change the live settings (None keeps a value); returns the new ones."""
        with self._lock:
            current = self._settings
            self._settings = AdmissionSettings(
                scale=current.scale if scale is None else float(scale),
                shed_batch=current.shed_batch if shed_batch is None else bool(shed_batch))
            return self._settings

    def bounds(self) -> QueueBounds:
        scale = self._settings.scale
        return QueueBounds(requests=max(1, int(self._max_requests * scale)),
                           tokens=max(1, int(self._max_tokens * scale)),
                           kv_bytes=max(1, int(self._max_kv_bytes * scale)))

    # -- the queue -------------------------------------------------------------------------------
    @property
    def queued(self) -> QueuedWork:
        """A snapshot of the queued work."""
        with self._lock:
            return replace(self._queued)

    @property
    def queued_requests(self) -> int:
        return self._queued.requests

    def reserve(self, tokens: int, kv_bytes: int, priority: Priority, free_slots: int = 0) -> None:
        """Count a request into the queue, or raise QueueFullError (or LoadShedError) if it may
        not join.

        ``free_slots`` is how many sequences the batch could take right now: that many queued
        requests are only waiting for their prefill, not for capacity, so the request bound
        leaves room for them (a burst of N clients against a batch of N is not overload).
        """
        with self._lock:
            refusal = self._refusal(tokens, kv_bytes, priority, free_slots)
            if refusal is not None:
                self.rejected += 1
                raise refusal
            q = self._queued
            q.requests += 1
            q.tokens += tokens
            q.kv_bytes += kv_bytes
            q.batch += priority is Priority.BATCH

    def release(self, tokens: int, kv_bytes: int, priority: Priority, *, admitted: bool) -> None:
        """Count a request out of the queue: ``admitted`` to the batch, or ended while waiting."""
        with self._lock:
            q = self._queued
            q.requests -= 1
            q.tokens -= tokens
            q.kv_bytes -= kv_bytes
            q.batch -= priority is Priority.BATCH
            if admitted:
                self._rate.record(tokens, kv_bytes)

    def _refusal(self, tokens: int, kv_bytes: int, priority: Priority,
                 free_slots: int) -> QueueFullError | None:
        q = self._queued
        if self._settings.shed_batch and priority is Priority.BATCH:
            return LoadShedError(
                "the engine is shedding batch-class requests under load; retry later",
                retry_after=self._retry_after(QueueLimit.REQUESTS, q.requests),
                limit=QueueLimit.SHED_BATCH.value)
        bounds = self.bounds()
        if q.requests >= bounds.requests + free_slots:
            return self._full(QueueLimit.REQUESTS, q.requests + 1 - bounds.requests - free_slots,
                              f"{q.requests} requests are waiting, the limit is "
                              f"{bounds.requests} requests beyond the {free_slots} free batch "
                              f"slots")
        if q.requests and q.tokens + tokens > bounds.tokens:
            return self._full(QueueLimit.TOKENS, min(q.tokens + tokens - bounds.tokens, q.tokens),
                              f"the waiting requests hold {q.tokens} prompt tokens and this one "
                              f"{tokens}, the limit is {bounds.tokens} tokens")
        if q.requests and q.kv_bytes + kv_bytes > bounds.kv_bytes:
            return self._full(QueueLimit.KV_MEMORY,
                              min(q.kv_bytes + kv_bytes - bounds.kv_bytes, q.kv_bytes),
                              f"the waiting requests need {_mib(q.kv_bytes)} of KV memory and "
                              f"this one {_mib(kv_bytes)}, the limit is {_mib(bounds.kv_bytes)} "
                              f"of KV memory")
        return None

    def _full(self, limit: QueueLimit, excess: int, detail: str) -> QueueFullError:
        return QueueFullError(f"the engine queue is full: {detail}",
                              retry_after=self._retry_after(limit, excess), limit=limit.value)

    def _retry_after(self, limit: QueueLimit, excess: int) -> float:
        """Seconds until ``excess`` of the bounded quantity leaves the queue at the recent rate."""
        rate = self._rate.per_second(limit)
        # Nothing left the queue lately (the batch is stuck on long requests): say the most.
        seconds = excess / rate if rate > 0 else MAX_RETRY_AFTER_S
        return min(max(seconds, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
