"""Hard limits that roll the canary back at once, without statistics.

Guards catch the canary that is plainly broken (errors on most requests, first tokens several
times slower) before a stage has gathered enough samples for the analysis. They are checked on
every tick, in every phase in which the canary serves traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from mlx_serving.canary.samples import SampleSet


class ErrorRateGuard(BaseModel):
    """Trip when the canary's error rate exceeds a ceiling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Check this guard.")
    ceiling: float = Field(
        default=0.10, gt=0.0, le=1.0,
        description="Trip when canary errors / canary samples is above this.")
    min_samples: int = Field(
        default=20, ge=1,
        description="Canary samples needed before the guard may trip.")


class TtftP95Guard(BaseModel):
    """Trip when the canary's p95 time to first token exceeds a multiple of stable's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Check this guard.")
    max_ratio: float = Field(
        default=2.0, gt=1.0,
        description="Trip when canary p95 TTFT > max_ratio x stable p95 TTFT.")
    min_samples: int = Field(
        default=100, ge=1,
        description="TTFT values needed in each arm before the guard may trip (stable's "
                    "recorded baseline stands in when stable has none, e.g. at 100%).")


class GuardConfig(BaseModel):
    """The hard limits; ``enabled=False`` switches all of them off (the simulation does)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Master switch for every guard.")
    error_rate: ErrorRateGuard = Field(
        default_factory=ErrorRateGuard, description="Canary error-rate ceiling.")
    ttft_p95: TtftP95Guard = Field(
        default_factory=TtftP95Guard, description="Canary/stable p95 TTFT ratio limit.")


@dataclass(frozen=True, slots=True)
class GuardTrip:
    """A tripped guard and the numbers that tripped it."""

    guard: str          # "error_rate" or "ttft_p95"
    value: float        # the observed rate or ratio
    threshold: float    # the configured ceiling or max ratio
    reason: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-safe form (for Decision.evidence)."""
        return {"guard": self.guard, "value": self.value, "threshold": self.threshold,
                "reason": self.reason, **self.details}


def check_guards(stable: SampleSet, canary: SampleSet, config: GuardConfig, *,
                 stable_ttft_p95_s: float | None = None) -> GuardTrip | None:
    """The first tripped guard (error rate before latency), or None.

    ``stable_ttft_p95_s`` is a recorded stable p95 used when the stable set has fewer than
    the guard's minimum (stable serves nothing at a 100% stage). Cheap enough for every
    tick: counts are kept as samples arrive and quantiles are cached per set version.
    """
    if not config.enabled:
        return None
    eg = config.error_rate
    if eg.enabled and canary.n >= eg.min_samples:
        rate = canary.errors / canary.n
        if rate > eg.ceiling:
            return GuardTrip("error_rate", rate, eg.ceiling,
                             f"canary error rate {rate:.3f} > ceiling {eg.ceiling:.3f} "
                             f"({canary.errors}/{canary.n})",
                             {"errors": canary.errors, "n_canary": canary.n,
                              "stable_error_rate": stable.error_rate})
    tg = config.ttft_p95
    if tg.enabled and canary.count("ttft") >= tg.min_samples:
        if stable.count("ttft") >= tg.min_samples:
            base, source = stable.quantile("ttft", 0.95), "stable samples"
        else:
            base, source = stable_ttft_p95_s, "recorded baseline"
        if base is not None and base > 0.0:
            p95 = canary.quantile("ttft", 0.95)
            ratio = p95 / base
            if ratio > tg.max_ratio:
                return GuardTrip("ttft_p95", ratio, tg.max_ratio,
                                 f"canary p95 TTFT {p95:.3f}s = {ratio:.2f} x stable "
                                 f"{base:.3f}s > {tg.max_ratio:.2f} x",
                                 {"canary_p95_s": p95, "stable_p95_s": base,
                                  "stable_source": source, "n_canary": canary.count("ttft"),
                                  "n_stable": stable.count("ttft")})
    return None
