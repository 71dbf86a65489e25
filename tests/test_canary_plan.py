"""Tests for mlx_serving.canary.plan."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mlx_serving.canary import AnalysisConfig, Flag, GuardConfig, RolloutPlan, Stage
from mlx_serving.canary.config import ErrorRateMetricConfig, LatencyMetricConfig
from mlx_serving.canary.guards import ErrorRateGuard, TtftP95Guard
from mlx_serving.canary.plan import stage_min_samples
from mlx_serving.canary.stats import (ni_miss_latency, ni_miss_proportion, required_samples,
                                      required_samples_proportion)


def test_default_plan():
    plan = RolloutPlan()
    assert [s.weight for s in plan.stages] == [5, 25, 50, 100]
    assert plan.comparative_stages == 3 and plan.max_looks == 6
    assert all(s.min_samples for s in plan.stages)
    assert plan.stages[-1].min_samples == 100  # the bake stage: the guards' minimum
    assert plan.stage_power == pytest.approx(0.8 ** (1 / 3))


def test_stage_sizes_reach_the_stage_power():
    plan = RolloutPlan()
    a = plan.analysis
    beta = 1 - plan.stage_power
    for stage in plan.stages[:3]:
        w, alpha, n = stage.weight / 100, a.alpha / 2, stage.min_samples

        def miss(k):
            return (sum(ni_miss_latency(k, m.margin, m.planning_sigma, alpha, w)
                        for _, m in a.latency_metrics())
                    + ni_miss_proportion(k, a.error_rate.margin, a.error_rate.planning_rate,
                                         alpha, w))
        assert miss(n) <= beta < miss(n - 1)
        assert n >= required_samples_proportion(0.005, 0.01, alpha, plan.stage_power, w)
        assert n >= required_samples(0.10, 0.5, alpha, plan.stage_power, w)


def test_given_min_samples_are_kept_and_round_trip():
    plan = RolloutPlan(stages=[Stage(weight=10, min_samples=123), Stage(weight=100)])
    assert plan.stages[0].min_samples == 123
    again = RolloutPlan.model_validate(plan.model_dump(mode="json"))
    assert again == plan


def test_wider_margins_need_fewer_samples():
    tight = RolloutPlan()
    loose = RolloutPlan(analysis=AnalysisConfig(error_rate={"margin": 0.01}))
    assert loose.stages[0].min_samples < tight.stages[0].min_samples / 2
    assert stage_min_samples(loose, loose.stages[0]) == loose.stages[0].min_samples


def test_validation():
    with pytest.raises(ValidationError):
        RolloutPlan(stages=[Stage(weight=50), Stage(weight=25)])
    with pytest.raises(ValidationError):
        Stage(weight=0)
    with pytest.raises(ValidationError):
        Stage(weight=5, min_sample=3)  # typo: extra="forbid"
    with pytest.raises(ValidationError):
        RolloutPlan(stages=[])
    for model in (Stage, RolloutPlan, AnalysisConfig, LatencyMetricConfig, ErrorRateMetricConfig,
                  GuardConfig, ErrorRateGuard, TtftP95Guard, Flag):
        assert all(f.description for f in model.model_fields.values()), model
