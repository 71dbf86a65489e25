"""A rollout plan: the stages a canary goes through and the rules that judge it.

The default plan is 5% -> 25% -> 50% -> 100%. The stages below 100% are *comparative*: they
end with an analysis of canary against stable. The 100% stage has no concurrent control
(stable serves nothing), so it is a *bake*: guards only (against stable's last recorded p95),
then PROMOTED. Each comparative stage's ``min_samples``, when not given, is computed by
:func:`stage_min_samples` (from ``required_samples`` / ``required_samples_proportion``) so that
a canary equal to stable passes every stage at its first look with probability >=
``analysis.power`` (docs/CANARY_STATS.md).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlx_serving.canary.config import (AnalysisConfig, ErrorRateMetricConfig,
                                       LatencyMetricConfig)
from mlx_serving.canary.guards import GuardConfig
from mlx_serving.canary.stats import (ni_miss_latency, ni_miss_proportion, required_samples,
                                      required_samples_proportion, smallest_n)

__all__ = ["AnalysisConfig", "ErrorRateMetricConfig", "LatencyMetricConfig", "RolloutPlan",
           "Stage", "default_stages", "stage_min_samples"]


class Stage(BaseModel):
    """One step of the rollout at a fixed canary weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(
        gt=0.0, le=100.0, description="Canary weight in percent of the traffic (0 < w <= 100).")
    min_samples: int | None = Field(
        default=None, ge=0,
        description="Canary samples needed before the stage may end. None: computed by "
                    "required_samples from the plan's analysis settings (comparative stages) "
                    "or the guards' minimums (the 100% stage).")
    min_duration_s: float = Field(
        default=600.0, ge=0.0,
        description="Seconds the stage runs at least (pauses do not count).")
    max_extensions: int = Field(
        default=1, ge=0, le=10,
        description="How many times an INCONCLUSIVE analysis may extend the stage (each "
                    "extension is a fresh look: new samples, min_duration and min_samples "
                    "again). When they are used up the rollout PAUSES for an operator.")
    auto_promote: bool = Field(
        default=True,
        description="After a PASS, move on by itself. False: wait for an operator's promote "
                    "(the canary keeps its weight; guards keep running).")

    @property
    def comparative(self) -> bool:
        """True below 100%: the stage ends with an analysis against stable."""
        return self.weight < 100.0


def default_stages() -> list[Stage]:
    """5% -> 25% -> 50% -> 100% (min_samples left to the plan to compute)."""
    return [Stage(weight=5.0), Stage(weight=25.0), Stage(weight=50.0), Stage(weight=100.0)]


class RolloutPlan(BaseModel):
    """Stages plus the analysis and guard settings of one rollout."""

    model_config = ConfigDict(extra="forbid")

    stages: list[Stage] = Field(
        default_factory=default_stages, min_length=1,
        description="Stages in order; weights strictly increasing.")
    analysis: AnalysisConfig = Field(
        default_factory=AnalysisConfig, description="Margins, alpha, power, minimums, SRM.")
    guards: GuardConfig = Field(
        default_factory=GuardConfig, description="Hard limits that roll back at once.")

    @model_validator(mode="after")
    def _check_and_size(self) -> "RolloutPlan":
        weights = [s.weight for s in self.stages]
        if any(b <= a for a, b in zip(weights, weights[1:])):
            raise ValueError(f"stage weights must increase strictly, got {weights}")
        self.stages = [s if s.min_samples is not None
                       else s.model_copy(update={"min_samples": stage_min_samples(self, s)})
                       for s in self.stages]
        return self

    @property
    def comparative_stages(self) -> int:
        """K: stages that end with an analysis (weight < 100)."""
        return sum(1 for s in self.stages if s.comparative)

    @property
    def max_looks(self) -> int:
        """The planned maximum number of analyses: sum of (1 + max_extensions) over the
        comparative stages. The FAIL tests spend alpha over these looks."""
        return sum(1 + s.max_extensions for s in self.stages if s.comparative)

    @property
    def stage_power(self) -> float:
        """power ** (1 / K): the first-look pass probability each comparative stage is sized
        for, so that an A/A canary passes all K independent stages with probability power."""
        return self.analysis.power ** (1.0 / max(1, self.comparative_stages))


def stage_min_samples(plan: RolloutPlan, stage: Stage) -> int:
    """Canary samples a stage needs (what the plan fills in when ``min_samples`` is None).

    Comparative stage at canary share w, each non-inferiority test at one-sided
    a = alpha / (1 + max_extensions): the smallest n_c at which the enabled metrics' miss
    probabilities (:func:`ni_miss_latency`, :func:`ni_miss_proportion`, a canary equal to
    stable assumed) add up to at most 1 - power**(1/K). By the union bound the stage's first
    look then passes such a canary with probability >= power**(1/K) whatever the correlation
    between metrics, and, stages using fresh samples, all K stages with probability >= power.
    It is at least the largest single-metric :func:`required_samples` /
    :func:`required_samples_proportion` at power**(1/K). 100% stage: the guards' minimums.
    """
    a = plan.analysis
    if not stage.comparative:
        g = plan.guards
        return max(a.min_samples, g.error_rate.min_samples, g.ttft_p95.min_samples)
    w = stage.weight / 100.0
    alpha = a.alpha / (1 + stage.max_extensions)
    power = plan.stage_power
    misses = [lambda n, m=m: ni_miss_latency(n, m.margin, m.planning_sigma, alpha, w)
              for _, m in a.latency_metrics()]
    starts = [required_samples(m.margin, m.planning_sigma, alpha, power, w)
              for _, m in a.latency_metrics()]
    e = a.error_rate
    if e.enabled:
        misses.append(lambda n: ni_miss_proportion(n, e.margin, e.planning_rate, alpha, w))
        starts.append(required_samples_proportion(e.margin, e.planning_rate, alpha, power, w))
    if not misses:
        return a.min_samples
    n = smallest_n(lambda n: sum(miss(n) for miss in misses), 1.0 - power, max(starts))
    return max(a.min_samples, n)
