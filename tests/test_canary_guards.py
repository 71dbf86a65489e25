"""Tests for mlx_serving.canary.guards."""

from __future__ import annotations

import numpy as np

from mlx_serving.canary import Arm, GuardConfig, SampleSet, check_guards
from mlx_serving.canary.guards import ErrorRateGuard, TtftP95Guard


def fill(arm, n, errors=0, ttft=0.2):
    s = SampleSet(arm)
    ttft_col = np.full(n, ttft) * np.linspace(0.5, 1.5, n)
    s.add_arrays(ttft_s=ttft_col, error=np.arange(n) < errors)
    return s


def test_error_ceiling_needs_min_samples():
    cfg = GuardConfig()
    assert check_guards(fill(Arm.STABLE, 1000), fill(Arm.CANARY, 19, errors=19), cfg) is None
    trip = check_guards(fill(Arm.STABLE, 1000), fill(Arm.CANARY, 20, errors=3), cfg)
    assert trip.guard == "error_rate" and trip.value == 0.15 and trip.threshold == 0.10
    assert trip.to_dict()["errors"] == 3
    assert check_guards(fill(Arm.STABLE, 1000), fill(Arm.CANARY, 20, errors=2), cfg) is None


def test_ttft_p95_ratio_needs_samples_in_both_arms():
    cfg = GuardConfig()
    slow = fill(Arm.CANARY, 200, ttft=0.5)
    trip = check_guards(fill(Arm.STABLE, 200), slow, cfg)
    assert trip.guard == "ttft_p95" and trip.value > 2.0
    assert check_guards(fill(Arm.STABLE, 99), slow, cfg) is None
    # no stable samples (100% stage): the recorded baseline stands in
    trip = check_guards(SampleSet(Arm.STABLE), slow, cfg, stable_ttft_p95_s=0.2)
    assert trip.guard == "ttft_p95" and trip.details["stable_source"] == "recorded baseline"
    assert check_guards(fill(Arm.STABLE, 200), fill(Arm.CANARY, 200, ttft=0.3), cfg) is None


def test_each_guard_can_be_switched_off():
    bad_errors = fill(Arm.CANARY, 200, errors=100, ttft=0.5)
    stable = fill(Arm.STABLE, 200)
    assert check_guards(stable, bad_errors, GuardConfig(enabled=False)) is None
    only_ttft = GuardConfig(error_rate=ErrorRateGuard(enabled=False))
    assert check_guards(stable, bad_errors, only_ttft).guard == "ttft_p95"
    neither = GuardConfig(error_rate=ErrorRateGuard(enabled=False),
                          ttft_p95=TtftP95Guard(enabled=False))
    assert check_guards(stable, bad_errors, neither) is None
