"""What the A/B analysis checks and how strictly: metrics, margins, alpha, power, minimums.

Re-exported by :mod:`mlx_serving.canary.plan` (a plan carries one); kept apart so that
:mod:`mlx_serving.canary.stats` can use it without importing the plan.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mlx_serving.canary.samples import LATENCY_METRICS


class LatencyMetricConfig(BaseModel):
    """One latency metric (compared on the log scale, i.e. as a ratio of geometric means)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Analyse this metric at all.")
    margin: float = Field(
        default=0.10, gt=0.0, lt=10.0,
        description="Non-inferiority margin as a relative slowdown: 0.10 means the canary "
                    "passes if its geometric mean is shown to be < 1.10 x stable's.")
    planning_sigma: float = Field(
        default=0.5, gt=0.0, lt=10.0,
        description="Expected standard deviation of the natural log of the latency; only "
                    "used to size stages (required_samples). A log-normal with sigma 0.5 has "
                    "p95/median = 2.3.")


class ErrorRateMetricConfig(BaseModel):
    """The error rate (share of failed requests), compared as a difference of proportions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Analyse the error rate at all.")
    margin: float = Field(
        default=0.005, gt=0.0, lt=1.0,
        description="Non-inferiority margin in absolute terms: 0.005 means the canary passes "
                    "if its error rate is shown to be < stable's + 0.5 percentage points.")
    planning_rate: float = Field(
        default=0.01, gt=0.0, lt=1.0,
        description="Expected error rate of stable; only used to size stages.")


class AnalysisConfig(BaseModel):
    """Settings of :func:`mlx_serving.canary.stats.analyze`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft: LatencyMetricConfig = Field(
        default_factory=LatencyMetricConfig, description="Time to first token.")
    itl: LatencyMetricConfig = Field(
        default_factory=LatencyMetricConfig,
        description="Inter-token latency (each request's mean).")
    e2e: LatencyMetricConfig = Field(
        default_factory=LatencyMetricConfig, description="End-to-end request latency.")
    error_rate: ErrorRateMetricConfig = Field(
        default_factory=ErrorRateMetricConfig, description="Share of failed requests.")
    alpha: float = Field(
        default=0.05, gt=0.0, lt=0.5,
        description="One-sided significance level. The FAIL (rollback) tests spend it over "
                    "the plan's looks (O'Brien-Fleming-type); the PASS (non-inferiority) "
                    "tests of a stage share it among the stage's possible looks.")
    power: float = Field(
        default=0.8, gt=0.5, lt=1.0,
        description="Wanted probability that a canary equal to stable passes every "
                    "comparative stage at its first look (extensions add more). Each of the "
                    "K comparative stages is sized for power**(1/K).")
    min_samples: int = Field(
        default=50, ge=2,
        description="Fewer usable values than this in either arm makes a metric NO_DATA.")
    srm_check: bool = Field(
        default=True, description="Check the observed split against the weight (SRM).")
    srm_p_threshold: float = Field(
        default=0.001, gt=0.0, lt=1.0,
        description="A chi-square SRM p-value below this flags a broken split; the outcome "
                    "is then INCONCLUSIVE whatever the metrics say.")

    def latency_metrics(self) -> list[tuple[str, LatencyMetricConfig]]:
        """The enabled latency metrics, in report order."""
        return [(m, getattr(self, m)) for m in LATENCY_METRICS if getattr(self, m).enabled]

    def metric_count(self) -> int:
        """How many metrics are analysed (M)."""
        return len(self.latency_metrics()) + int(self.error_rate.enabled)
