"""A circuit breaker per variant: stop sending requests to a backend that keeps failing.

Each Router replica keeps one :class:`CircuitBreaker` per variant. The lifecycle:

- CLOSED: every request goes through. ``consecutive_failures`` failures in a row, or a failure
  share of at least ``failure_rate`` among the last ``window`` verdicts (once ``min_calls`` are
  in the window), open it.
- OPEN: requests fail fast. After the open period it turns HALF_OPEN (lazily, when next
  looked at).
- HALF_OPEN: up to ``half_open_probes`` requests are let through at once as probes.
  ``close_after`` successful probes close it; one failed probe opens it again with the open
  period multiplied by ``backoff`` (capped at ``max_open_s``). Closing resets the period.

Calls carry no identity, so a verdict that arrives while probes are out is taken as a probe's,
even if its call was admitted before the circuit opened (a long stream). That errs in a harmless
direction: the verdict is still fresh news about the backend. Verdicts that arrive while the
circuit is open, or half-open with no probe out, are dropped: the circuit has already judged.

Not thread-safe: a breaker lives on one asyncio event loop.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)


class CircuitState(str, enum.Enum):
    """Where a breaker is in its lifecycle."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: ``on_transition(name, old_state, new_state, reason)``.
TransitionCallback = Callable[[str, CircuitState, CircuitState, str], None]


class CircuitConfig(BaseModel):
    """When a variant's circuit opens, how long it stays open and how it closes again."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Use circuit breaking at all.")
    consecutive_failures: int = Field(
        default=5, ge=1, description="Open after this many failures in a row.")
    failure_rate: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="Open when at least this share of the last `window` verdicts failed "
                    "(once `min_calls` are in the window).")
    window: int = Field(default=20, ge=1,
                        description="How many recent verdicts the failure rate is taken over.")
    min_calls: int = Field(default=10, ge=1,
                           description="Verdicts needed in the window before the rate counts.")
    open_s: float = Field(default=5.0, gt=0.0,
                          description="Seconds open before probes may go (first opening).")
    backoff: float = Field(default=2.0, ge=1.0,
                           description="Each failed probe multiplies the open period by this.")
    max_open_s: float = Field(default=60.0, gt=0.0, description="Longest open period.")
    half_open_probes: int = Field(default=2, ge=1,
                                  description="Requests let through at once while half-open.")
    close_after: int = Field(default=2, ge=1,
                             description="Successful probes that close the circuit.")

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_calls > self.window:
            raise ValueError(f"min_calls ({self.min_calls}) exceeds window ({self.window})")
        if self.max_open_s < self.open_s:
            raise ValueError(f"max_open_s ({self.max_open_s}) is below open_s ({self.open_s})")
        return self


class CircuitBreaker:
    """One variant's circuit as one Router replica sees it.

    Use: ``if not breaker.admit(): fail fast (Retry-After: breaker.retry_after_s)``; then, when
    the call ends, ``breaker.record(ok)`` if it says something about the backend, else
    ``breaker.release()``.
    """

    def __init__(self, name: str, config: CircuitConfig,
                 clock: Callable[[], float] = time.monotonic,
                 on_transition: TransitionCallback | None = None) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_transition = on_transition
        self._state = CircuitState.CLOSED
        self._outcomes: deque[bool] = deque(maxlen=config.window)  # True = failed
        self._window_failures = 0
        self._consecutive_failures = 0
        self._opened_at: float | None = None
        self._open_s = config.open_s
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._times_opened = 0

    # ---- the request path ------------------------------------------------------------------
    @property
    def state(self) -> CircuitState:
        """The current state; an OPEN circuit whose open period has passed turns HALF_OPEN."""
        if (self._state is CircuitState.OPEN
                and self._clock() >= self._opened_at + self._open_s):
            self._transition(CircuitState.HALF_OPEN, f"open for {self._open_s:g}s")
        return self._state

    def admit(self) -> bool:
        """Whether a request may go to the backend (False: fail fast). While HALF_OPEN an
        admitted request is a probe and holds a probe slot until its record() or release()."""
        if not self.config.enabled:
            return True
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if (state is CircuitState.HALF_OPEN
                and self._probes_in_flight < self.config.half_open_probes):
            self._probes_in_flight += 1
            return True
        return False

    def record(self, ok: bool) -> None:
        """The verdict of an admitted call: ``ok=False`` when the backend failed it."""
        if not self.config.enabled:
            return
        state = self.state
        if state is CircuitState.CLOSED:
            self._record_closed(ok)
        elif state is CircuitState.HALF_OPEN and self._probes_in_flight:
            self._probes_in_flight -= 1
            self._record_probe(ok)

    def release(self) -> None:
        """End an admitted call that says nothing about the backend (the client went away,
        the request was invalid): frees its probe slot, counts toward nothing."""
        if (self.config.enabled and self.state is CircuitState.HALF_OPEN
                and self._probes_in_flight):
            self._probes_in_flight -= 1

    @property
    def retry_after_s(self) -> float:
        """Seconds until admit() may let a request through: 0 when it would now, the rest of
        the open period when OPEN; when HALF_OPEN with every probe slot taken it depends on
        when the probes end, and the base ``open_s`` is given as a guess."""
        if not self.config.enabled:
            return 0.0
        state = self.state
        if state is CircuitState.OPEN:
            return max(0.0, self._opened_at + self._open_s - self._clock())
        if (state is CircuitState.HALF_OPEN
                and self._probes_in_flight >= self.config.half_open_probes):
            return self.config.open_s
        return 0.0

    def snapshot(self) -> dict:
        """JSON-safe state for the admin API (``opened_at`` is on the breaker's clock)."""
        state = self.state
        calls = len(self._outcomes)
        return {
            "name": self.name,
            "enabled": self.config.enabled,
            "state": state.value,
            "consecutive_failures": self._consecutive_failures,
            "window_calls": calls,
            "window_failures": self._window_failures,
            "failure_rate": self._window_failures / calls if calls else None,
            "opened_at": self._opened_at,
            "open_s": self._open_s,
            "retry_after_s": self.retry_after_s,
            "probes_in_flight": self._probes_in_flight,
            "probe_successes": self._probe_successes,
            "times_opened": self._times_opened,
        }

    # ---- transitions -----------------------------------------------------------------------
    def _record_closed(self, ok: bool) -> None:
        if len(self._outcomes) == self._outcomes.maxlen and self._outcomes[0]:
            self._window_failures -= 1  # the oldest verdict is about to drop out
        self._outcomes.append(not ok)
        if ok:
            self._consecutive_failures = 0
        else:
            self._window_failures += 1
            self._consecutive_failures += 1
        reason = self._trip_reason()
        if reason is not None:
            self._open(reason)

    def _trip_reason(self) -> str | None:
        cfg = self.config
        if self._consecutive_failures >= cfg.consecutive_failures:
            return f"{self._consecutive_failures} failures in a row"
        calls = len(self._outcomes)
        if calls >= cfg.min_calls:
            rate = self._window_failures / calls
            if rate >= cfg.failure_rate:
                return f"{rate:.0%} of the last {calls} calls failed"
        return None

    def _record_probe(self, ok: bool) -> None:
        if not ok:
            self._open_s = min(self._open_s * self.config.backoff, self.config.max_open_s)
            self._open("probe failed")
            return
        self._probe_successes += 1
        if self._probe_successes >= self.config.close_after:
            self._close(f"{self._probe_successes} probes succeeded")

    def _open(self, reason: str) -> None:
        self._opened_at = self._clock()
        self._times_opened += 1
        self._reset_counts()
        self._transition(CircuitState.OPEN, reason)

    def _close(self, reason: str) -> None:
        self._opened_at = None
        self._open_s = self.config.open_s
        self._reset_counts()
        self._transition(CircuitState.CLOSED, reason)

    def _reset_counts(self) -> None:
        self._outcomes.clear()
        self._window_failures = 0
        self._consecutive_failures = 0
        self._probes_in_flight = 0
        self._probe_successes = 0

    def _transition(self, new: CircuitState, reason: str) -> None:
        old, self._state = self._state, new
        if new is CircuitState.OPEN:
            log.warning("circuit %s: %s -> open (%s); probes in %.1fs",
                        self.name, old.value, reason, self._open_s)
        else:
            log.info("circuit %s: %s -> %s (%s)", self.name, old.value, new.value, reason)
        if self._on_transition is not None:
            self._on_transition(self.name, old, new, reason)
