"""Tests for mlx_serving.deployments.circuit."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from mlx_serving.deployments.circuit import CircuitBreaker, CircuitConfig, CircuitState

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**overrides):
    clock = FakeClock()
    transitions = []
    breaker = CircuitBreaker("v1", CircuitConfig(**overrides), clock=clock,
                             on_transition=lambda *t: transitions.append(t))
    return breaker, clock, transitions


def call(breaker, ok: bool) -> None:
    assert breaker.admit()
    breaker.record(ok)


def open_it(breaker, clock, failures: int = 5) -> None:
    for _ in range(failures):
        call(breaker, False)
    assert breaker.state is OPEN


def test_consecutive_failures_open_and_a_success_resets_the_run():
    breaker, _, transitions = make()
    for _ in range(4):
        call(breaker, False)
    call(breaker, True)
    for _ in range(4):
        call(breaker, False)
    assert breaker.state is CLOSED and transitions == []
    call(breaker, False)
    assert breaker.state is OPEN
    assert transitions == [("v1", CLOSED, OPEN, "5 failures in a row")]
    assert not breaker.admit()


def test_failure_rate_opens_once_min_calls_are_in_the_window():
    breaker, _, transitions = make(consecutive_failures=100, min_calls=10, window=20)
    for _ in range(4):  # fail, ok alternating: 4 failures out of 8, under min_calls
        call(breaker, False)
        call(breaker, True)
    assert breaker.state is CLOSED
    call(breaker, False)
    assert breaker.state is CLOSED  # 5/9: still under min_calls
    call(breaker, True)  # 5/10 = 50%
    assert breaker.state is OPEN
    assert transitions == [("v1", CLOSED, OPEN, "50% of the last 10 calls failed")]


def test_failure_rate_is_over_the_last_window_verdicts_only():
    breaker, _, _ = make(consecutive_failures=100, min_calls=10, window=10, failure_rate=0.5)
    for _ in range(4):
        call(breaker, False)
    for _ in range(16):  # the four failures scroll out of the window
        call(breaker, True)
    assert breaker.snapshot()["window_failures"] == 0
    for _ in range(4):
        call(breaker, False)
    assert breaker.state is CLOSED  # 4/10
    call(breaker, False)
    assert breaker.state is OPEN  # 5/10


def test_open_turns_half_open_after_open_s():
    breaker, clock, transitions = make()
    open_it(breaker, clock)
    assert breaker.retry_after_s == 5.0
    clock.advance(4.9)
    assert breaker.state is OPEN and not breaker.admit()
    assert breaker.retry_after_s == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.state is HALF_OPEN and breaker.retry_after_s == 0.0
    assert transitions[-1] == ("v1", OPEN, HALF_OPEN, "open for 5s")


def test_half_open_lets_only_the_probe_limit_through():
    breaker, clock, _ = make(half_open_probes=2)
    open_it(breaker, clock)
    clock.advance(5)
    assert breaker.admit() and breaker.admit()
    assert not breaker.admit()
    assert breaker.retry_after_s == 5.0  # every slot taken: the base open period as a guess
    assert breaker.snapshot()["probes_in_flight"] == 2


def test_successful_probes_close_and_reset_the_counts():
    breaker, clock, transitions = make(close_after=2)
    open_it(breaker, clock)
    clock.advance(5)
    call(breaker, True)
    assert breaker.state is HALF_OPEN
    call(breaker, True)
    assert breaker.state is CLOSED
    assert transitions[-1] == ("v1", HALF_OPEN, CLOSED, "2 probes succeeded")
    snap = breaker.snapshot()
    assert snap["window_calls"] == 0 and snap["consecutive_failures"] == 0
    assert snap["opened_at"] is None
    for _ in range(4):  # the failures that opened it are forgotten
        call(breaker, False)
    assert breaker.state is CLOSED


def test_failed_probe_reopens_with_backoff_capped_and_reset_on_close():
    breaker, clock, transitions = make(open_s=5, backoff=2, max_open_s=15)
    open_it(breaker, clock)
    for expected_open_s in (10.0, 15.0, 15.0):
        clock.advance(breaker.snapshot()["open_s"])
        call(breaker, False)
        assert breaker.state is OPEN
        assert transitions[-1] == ("v1", HALF_OPEN, OPEN, "probe failed")
        assert breaker.retry_after_s == expected_open_s
    clock.advance(15)
    call(breaker, True)
    call(breaker, True)
    assert breaker.state is CLOSED and breaker.snapshot()["open_s"] == 5.0
    open_it(breaker, clock)
    assert breaker.retry_after_s == 5.0


def test_release_frees_a_probe_slot_without_counting():
    breaker, clock, _ = make(half_open_probes=1, close_after=1)
    open_it(breaker, clock)
    clock.advance(5)
    assert breaker.admit()
    assert not breaker.admit()
    breaker.release()
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot()["probe_successes"] == 0
    assert breaker.admit()
    breaker.record(True)
    assert breaker.state is CLOSED


def test_release_while_closed_counts_toward_nothing():
    breaker, _, _ = make()
    for _ in range(4):
        call(breaker, False)
    assert breaker.admit()
    breaker.release()
    call(breaker, False)
    assert breaker.state is OPEN  # the release did not break the run of failures


def test_verdicts_while_open_are_dropped():
    breaker, clock, _ = make()
    for _ in range(3):
        assert breaker.admit()  # long calls admitted before the circuit opened
    open_it(breaker, clock)
    for _ in range(3):
        breaker.record(True)
    assert breaker.state is OPEN
    clock.advance(5)
    breaker.record(True)  # half-open but no probe out: not a probe's verdict
    assert breaker.state is HALF_OPEN and breaker.snapshot()["probe_successes"] == 0


def test_snapshot_shape():
    breaker, clock, _ = make()
    call(breaker, True)
    call(breaker, False)
    assert breaker.snapshot() == {
        "name": "v1", "enabled": True, "state": "closed", "consecutive_failures": 1,
        "window_calls": 2, "window_failures": 1, "failure_rate": 0.5, "opened_at": None,
        "open_s": 5.0, "retry_after_s": 0.0, "probes_in_flight": 0, "probe_successes": 0,
        "times_opened": 0}
    open_it(breaker, clock, failures=4)
    snap = breaker.snapshot()
    assert snap["state"] == "open" and snap["opened_at"] == clock.now
    assert snap["times_opened"] == 1 and snap["failure_rate"] is None


def test_disabled_breaker_always_admits():
    breaker, _, transitions = make(enabled=False)
    for _ in range(50):
        call(breaker, False)
    assert breaker.state is CLOSED and breaker.admit() and transitions == []
    assert breaker.retry_after_s == 0.0


def test_transitions_are_logged(caplog):
    breaker, clock, _ = make()
    with caplog.at_level(logging.INFO, logger="mlx_serving.deployments.circuit"):
        open_it(breaker, clock)
        clock.advance(5)
        assert breaker.state is HALF_OPEN
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels[0][0] == logging.WARNING and "5 failures in a row" in levels[0][1]
    assert levels[1][0] == logging.INFO and "half_open" in levels[1][1]


@pytest.mark.parametrize("bad", [
    {"min_calls": 30, "window": 20},
    {"open_s": 10, "max_open_s": 5},
    {"failure_rate": 0},
    {"backoff": 0.5},
    {"half_open_probes": 0},
    {"unknown": 1},
])
def test_config_rejects_inconsistent_values(bad):
    with pytest.raises(ValidationError):
        CircuitConfig(**bad)
