"""One request's life inside the engine, and the queues the scheduler keeps sequences in."""

from __future__ import annotations

import enum
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mlx_serving.engine.params import GenerationRequest, Priority
from mlx_serving.engine.stream import RequestStream

KV_ALLOCATION_STEP = 256  # mlx-lm's KV caches grow in steps of this many tokens


def kv_reservation(bytes_per_token: int, tokens: int) -> int:
    """The KV memory a cache of ``tokens`` tokens occupies, in whole allocation steps."""
    return bytes_per_token * (-(-tokens // KV_ALLOCATION_STEP) * KV_ALLOCATION_STEP)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued, not yet admitted
    RUNNING = "running"    # in the BatchGenerator
    PAUSED = "paused"      # out of the batch, KV cache kept (see PauseReason)
    FINISHED = "finished"


class PauseReason(enum.Enum):
    SLOW_READER = "slow_reader"  # its reader lags; resumed once it catches up
    PREEMPTED = "preempted"      # made room for interactive work; resumed once none waits


@dataclass(eq=False)
class Sequence:
    """Engine-internal state of one request. Touched only by the engine thread after submit."""

    request: GenerationRequest
    model_name: str
    prompt_ids: list[int]
    max_tokens: int
    stream: RequestStream
    kv_bytes: int                      # KV memory reserved for prompt + max_tokens
    kv_bytes_per_token: int = 0
    detokenizer: Any = None            # IncrementalDetokenizer, built on admission
    stop_matcher: Any = None           # StopStringMatcher or None
    status: SequenceStatus = SequenceStatus.WAITING
    pause_reason: PauseReason | None = None   # set while PAUSED
    kv_held: int = 0                   # KV bytes reserved now: kv_bytes once admitted, less
                                       # while preempted (only what its cache holds)
    uid: int | None = None             # BatchGenerator uid while RUNNING
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    paused_cache: list | None = None   # KV cache held while PAUSED
    paused_at: float = 0.0
    submitted_at: float = field(default_factory=time.monotonic)
    submitted_wall: float = field(default_factory=time.time)
    admitted_at: float | None = None
    joined_at: float | None = None     # prompt pass done, in the decode batch (first time)
    first_token_at: float | None = None
    # engine steps (SchedulerCounters.steps) at admission, joining and the first token
    admitted_step: int = 0
    joined_step: int = 0
    first_token_step: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self):
        return self.request.params

    @property
    def priority(self) -> Priority:
        return self.request.priority

    @property
    def deadline(self) -> float | None:
        """When the request's ``timeout_s`` runs out (monotonic clock), if it has one: from
        its submission here, or from its ``deadline_at`` where that comes first."""
        at = self.request.deadline_at
        budgets = [b for b in (self.request.timeout_s,
                               None if at is None else at - self.submitted_wall) if b is not None]
        return self.submitted_at + min(budgets) if budgets else None

    @property
    def remaining_tokens(self) -> int:
        return self.max_tokens - len(self.generated)

    @property
    def kv_in_cache(self) -> int:
        """The KV memory its cache occupies now (prompt and generated tokens so far)."""
        return kv_reservation(self.kv_bytes_per_token, len(self.prompt_ids) + len(self.generated))


class WaitQueue:
    """Sequences waiting for admission: interactive ones first, in arrival order within a class."""

    def __init__(self):
        self._interactive: deque[Sequence] = deque()
        self._batch: deque[Sequence] = deque()

    def __bool__(self) -> bool:
        return bool(self._interactive or self._batch)

    def __len__(self) -> int:
        return len(self._interactive) + len(self._batch)

    @property
    def has_interactive(self) -> bool:
        return bool(self._interactive)

    def _class_of(self, seq: Sequence) -> deque[Sequence]:
        return self._batch if seq.priority is Priority.BATCH else self._interactive

    def append(self, seq: Sequence) -> None:
        self._class_of(seq).append(seq)

    def head(self) -> Sequence:
        """The sequence to admit next."""
        return self._interactive[0] if self._interactive else self._batch[0]

    def pop_head(self) -> Sequence:
        return self._interactive.popleft() if self._interactive else self._batch.popleft()

    def remove(self, seq: Sequence) -> None:
        self._class_of(seq).remove(seq)


class DeadlineHeap:
    """Sequences with a deadline, nearest first.

    Sequences that finish before their deadline stay in the heap and are skipped when they
    surface; ``compact`` drops them once they outnumber the live ones.
    """

    def __init__(self):
        self._heap: list[tuple[float, int, Sequence]] = []
        self._order = itertools.count()   # breaks ties; sequences do not compare

    def __bool__(self) -> bool:
        return bool(self._heap)

    def push(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, (seq.deadline, next(self._order), seq))

    @property
    def nearest(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_expired(self, now: float) -> list[Sequence]:
        """Remove and return the unfinished sequences whose deadline is at or before ``now``."""
        heap, expired = self._heap, []
        while heap and heap[0][0] <= now:
            seq = heapq.heappop(heap)[2]
            if seq.status is not SequenceStatus.FINISHED:
                expired.append(seq)
        return expired

    def compact(self, live: int) -> None:
        """Drop finished sequences once the heap holds more than twice ``live`` entries."""
        if len(self._heap) > max(64, 2 * live):
            self._heap = [e for e in self._heap if e[2].status is not SequenceStatus.FINISHED]
            heapq.heapify(self._heap)
