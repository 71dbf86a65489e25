"""Tests for mlx_serving.deployments.qos."""

from __future__ import annotations

import logging
import math

import pytest
from pydantic import ValidationError

from mlx_serving.deployments.qos import (Action, Directive, QosConfig, QosMonitor, Slo,
                                         SloConfig)

FAST = {"ttft_s": 0.2, "itl_s": 0.02}
SLOW_TTFT = {"ttft_s": 6.0, "itl_s": 0.02}
SLOW_ITL = {"ttft_s": 0.2, "itl_s": 0.6}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**overrides) -> tuple[QosMonitor, FakeClock]:
    clock = FakeClock()
    return QosMonitor(QosConfig(**overrides), clock=clock), clock


def feed(monitor, variant, n, *, errors=0, ttft_s=0.2, itl_s=0.02):
    for i in range(n):
        monitor.record(variant, ttft_s, itl_s, i < errors)


def test_no_verdict_under_min_samples():
    monitor, _ = make()
    feed(monitor, "a", 19, errors=19, **SLOW_TTFT)
    report = monitor.evaluate()
    assert report.variants["a"].samples == 19 and report.variants["a"].violated == ()
    assert report.directive("a") == Directive() and report.alerts == ()
    feed(monitor, "a", 1, errors=1)
    assert monitor.evaluate().variants["a"].violated == (Slo.ERROR_RATE,)


def test_latency_slos_count_only_successful_requests():
    monitor, _ = make()
    feed(monitor, "a", 19, **SLOW_TTFT)
    feed(monitor, "a", 30, errors=30, ttft_s=0.1)  # failed: error rate only
    stats = monitor.evaluate().variants["a"]
    assert stats.samples == 49 and stats.errors == 30 and stats.ttft_p95_s == 6.0
    assert Slo.TTFT_P95 not in stats.violated  # 19 usable TTFTs < min_samples


@pytest.mark.parametrize("sample, slo", [(SLOW_TTFT, Slo.TTFT_P95), (SLOW_ITL, Slo.ITL_P95)])
def test_latency_slo_violated_and_met(sample, slo):
    monitor, _ = make()
    feed(monitor, "a", 18, **FAST)
    feed(monitor, "a", 2, **sample)  # 2/20 slow: the nearest-rank p95 is the 19th value
    stats = monitor.evaluate().variants["a"]
    assert stats.violated == (slo,)
    fine, _ = make()
    feed(fine, "a", 19, **FAST)
    feed(fine, "a", 1, **sample)  # 1/20 slow: p95 is still a fast value
    assert fine.evaluate().variants["a"].violated == ()


def test_error_rate_violated_only_above_the_ceiling():
    monitor, _ = make()
    feed(monitor, "a", 20, errors=1)  # 5% is not above 5%
    assert monitor.evaluate().variants["a"].violated == ()
    feed(monitor, "a", 20, errors=2)  # 3/40
    assert monitor.evaluate().variants["a"].violated == (Slo.ERROR_RATE,)


def test_percentiles_are_nearest_rank_and_ignore_unusable_values():
    monitor, _ = make()
    for value in range(1, 101):
        monitor.record("a", float(value), None, False)
    for junk in (None, math.nan, math.inf, -1.0, 0.0):
        monitor.record("a", junk, junk, False)
    stats = monitor.evaluate().variants["a"]
    assert stats.ttft_p95_s == 95.0 and stats.itl_p95_s is None and stats.samples == 105


def test_window_expiry_drops_old_samples():
    monitor, clock = make()
    feed(monitor, "a", 20, errors=20)
    clock.now += 29.9
    feed(monitor, "a", 1)
    assert monitor.evaluate().variants["a"].samples == 21
    clock.now += 0.2
    stats = monitor.evaluate().variants["a"]
    assert stats.samples == 1 and stats.errors == 0


def test_each_window_is_capped():
    monitor, _ = make(max_samples_per_variant=50)
    feed(monitor, "a", 50, errors=50)
    feed(monitor, "a", 50)
    stats = monitor.evaluate().variants["a"]
    assert stats.samples == 50 and stats.errors == 0


def test_a_wrapped_window_still_expires_oldest_first():
    monitor, clock = make(max_samples_per_variant=50)
    feed(monitor, "a", 30, errors=30)
    clock.now += 20
    feed(monitor, "a", 40)  # overwrites 20 of the failures
    stats = monitor.evaluate().variants["a"]
    assert stats.samples == 50 and stats.errors == 10
    clock.now += 15  # the remaining failures are 35 s old
    stats = monitor.evaluate().variants["a"]
    assert stats.samples == 40 and stats.errors == 0


@pytest.mark.parametrize("sample, errors, shed, scale, alert_slo", [
    (SLOW_TTFT, 0, True, 0.5, Slo.TTFT_P95),
    (SLOW_ITL, 0, True, 1.0, Slo.ITL_P95),
    (FAST, 10, False, 1.0, Slo.ERROR_RATE),
])
def test_default_actions_per_slo(sample, errors, shed, scale, alert_slo):
    monitor, clock = make()
    feed(monitor, "a", 20, errors=errors, **sample)
    report = monitor.evaluate()
    assert report.directive("a") == Directive(shed_batch=shed, admission_scale=scale)
    assert [(a.slo, a.variant, a.since) for a in report.alerts] == [(alert_slo, "a", clock.now)]
    assert report.changed == (report.directive("a") != Directive())


def test_custom_mapping_replaces_only_the_named_slos():
    monitor, _ = make(actions={"ttft_p95": [Action.ALERT], "itl_p95": []})
    assert monitor.config.actions[Slo.ERROR_RATE] == [Action.ALERT, Action.ROLLBACK_CANARY]
    feed(monitor, "a", 20, **SLOW_TTFT)
    feed(monitor, "b", 20, **SLOW_ITL)
    report = monitor.evaluate()
    assert report.directive("a") == Directive() and report.directive("b") == Directive()
    assert [(a.slo, a.variant) for a in report.alerts] == [(Slo.TTFT_P95, "a")]


def test_admission_steps_down_to_the_floor_and_back_after_recovery():
    monitor, clock = make(slo=SloConfig(window_s=1.0), recover_after_s=5.0,
                          admission_step_interval_s=0.0)
    feed(monitor, "a", 20, **SLOW_TTFT)
    scales = []
    for _ in range(3):
        report = monitor.evaluate()
        scales.append(report.directive("a").admission_scale)
        clock.now += 0.5
    assert scales == [0.5, 0.25, 0.25]  # the last look that saw it was at 101.0
    clock.now = 102.0
    feed(monitor, "a", 20, **FAST)
    report = monitor.evaluate()  # healthy, but within recover_after_s: hold
    assert report.directive("a") == Directive(shed_batch=True, admission_scale=0.25)
    assert not report.changed
    clock.now = 105.9
    assert monitor.evaluate().directive("a").shed_batch
    clock.now = 106.0
    report = monitor.evaluate()
    assert report.directive("a") == Directive(shed_batch=False, admission_scale=0.5)
    assert report.changed and report.alerts == ()
    clock.now = 106.5
    report = monitor.evaluate()
    assert report.directive("a") == Directive() and report.changed
    assert not monitor.evaluate().changed


def test_the_admission_scale_changes_at_most_once_per_step_interval():
    monitor, clock = make(slo=SloConfig(window_s=60.0), admission_step_interval_s=5.0)
    feed(monitor, "a", 20, **SLOW_TTFT)
    scales = []
    for _ in range(12):
        scales.append(monitor.evaluate().directive("a").admission_scale)
        clock.now += 0.5
    assert scales == [0.5] * 10 + [0.25] * 2


def test_a_violation_seen_again_restarts_the_recovery_period():
    monitor, clock = make(slo=SloConfig(window_s=1.0), recover_after_s=5.0)
    feed(monitor, "a", 20, errors=20)
    since = monitor.evaluate().alerts[0].since
    clock.now += 4.0
    feed(monitor, "a", 20, errors=20)
    alert = monitor.evaluate().alerts[0]
    assert alert.since == since and alert.last_seen == clock.now
    clock.now += 4.9
    assert monitor.evaluate().alerts != ()
    clock.now += 0.1
    assert monitor.evaluate().alerts == ()


def test_rollback_only_when_the_canary_alone_violates():
    monitor, _ = make()
    feed(monitor, "v1", 20)
    feed(monitor, "v2", 20, errors=4)
    report = monitor.evaluate(canary="v2", stable="v1")
    assert report.rollback_canary == ("canary v2 violates error_rate "
                                      "(error rate 20.0% > 5.0%); stable v1 does not")
    assert monitor.evaluate().rollback_canary is None  # no rollout named

    both, _ = make()
    feed(both, "v1", 20, errors=4)
    feed(both, "v2", 20, errors=4)
    assert both.evaluate(canary="v2", stable="v1").rollback_canary is None


def test_no_rollback_while_stable_recovers_from_the_same_violation():
    monitor, clock = make(slo=SloConfig(window_s=1.0))
    feed(monitor, "v1", 20, errors=4)
    monitor.evaluate()
    clock.now += 2.0  # stable's errors left the window; its violation is still active
    feed(monitor, "v1", 20)
    feed(monitor, "v2", 20, errors=4)
    assert monitor.evaluate(canary="v2", stable="v1").rollback_canary is None


def test_no_rollback_for_an_slo_not_mapped_to_it():
    monitor, _ = make()
    feed(monitor, "v1", 20)
    feed(monitor, "v2", 20, **SLOW_TTFT)
    report = monitor.evaluate(canary="v2", stable="v1")
    assert report.variants["v2"].violated == (Slo.TTFT_P95,)
    assert report.rollback_canary is None


def test_disabled_slos_are_not_judged():
    monitor, _ = make(slo=SloConfig(ttft_p95_s=None, itl_p95_s=None, error_rate=None))
    feed(monitor, "a", 20, errors=10, ttft_s=9.0, itl_s=9.0)
    report = monitor.evaluate()
    assert report.variants["a"].violated == () and report.directive("a") == Directive()
    assert report.variants["a"].ttft_p95_s == 9.0  # still measured


def test_disabled_monitor_records_nothing():
    monitor, _ = make(enabled=False)
    feed(monitor, "a", 20, errors=20)
    report = monitor.evaluate()
    assert report.variants == {} and report.directives == {} and not report.changed


def test_idle_variants_are_forgotten():
    monitor, clock = make(recover_after_s=0.0)
    feed(monitor, "a", 20)
    assert "a" in monitor.evaluate().variants
    clock.now += 31
    assert "a" in monitor.evaluate().variants  # seen empty once, then dropped
    assert monitor.evaluate().variants == {}


def test_violations_are_logged(caplog):
    monitor, clock = make(recover_after_s=0.0, slo=SloConfig(window_s=1.0))
    with caplog.at_level(logging.INFO, logger="mlx_serving.deployments.qos"):
        feed(monitor, "a", 20, errors=20)
        monitor.evaluate()
        clock.now += 2
        monitor.evaluate()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["QoS: a violates error_rate: error rate 100.0% > 5.0%; "
                        "actions: ['alert', 'rollback_canary']"]
    assert any("meets error_rate again" in r.getMessage() for r in caplog.records)


def test_report_to_dict_shape():
    monitor, clock = make()
    feed(monitor, "a", 40, errors=4, **SLOW_TTFT)
    assert monitor.evaluate().to_dict() == {
        "at": clock.now,
        "variants": {"a": {"samples": 40, "errors": 4, "ttft_p95_s": 6.0, "itl_p95_s": 0.02,
                           "error_rate": 0.1, "violated": ["ttft_p95", "error_rate"]}},
        "directives": {"a": {"shed_batch": True, "admission_scale": 0.5}},
        "alerts": [
            {"slo": "ttft_p95", "variant": "a", "observed": 6.0, "target": 5.0,
             "since": clock.now, "last_seen": clock.now},
            {"slo": "error_rate", "variant": "a", "observed": 0.1, "target": 0.05,
             "since": clock.now, "last_seen": clock.now},
        ],
        "rollback_canary": None,
        "changed": True,
    }
    assert Directive.from_dict(Directive(True, 0.5).to_dict()) == Directive(True, 0.5)


@pytest.mark.parametrize("bad", [
    {"actions": {"p99_ttft": ["alert"]}},
    {"actions": {"ttft_p95": ["page_someone"]}},
    {"admission_step": 1.0},
    {"admission_floor": 0.0},
    {"slo": {"error_rate": 1.5}},
    {"slo": {"window": 30}},
])
def test_config_rejects_unknown_keys_and_bad_values(bad):
    with pytest.raises(ValidationError):
        QosConfig(**bad)
