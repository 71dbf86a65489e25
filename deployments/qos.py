"""The QoS monitor: service-level objectives over sliding windows, turned into actions.

The RolloutController records one sample per finished request (from every Router) and
evaluates the monitor on its ticker. The :class:`QosReport` it gets back carries, per variant,
a :class:`Directive` that it publishes to the Routers (shed batch-class traffic) and the
LLMServer replicas (scale the queue bounds), the active alerts, and a canary rollback request.

Rules, so that every reader of a report counts the same way:

- A latency enters its percentile only if the request did not fail and the value is a finite
  number > 0 (as in :mod:`mlx_serving.canary.samples`); failed requests count toward the error
  rate only.
- Percentiles are nearest-rank: the p95 of n values is the ceil(0.95 n)-th smallest, always
  an observed value (numpy's ``method="inverted_cdf"``).
- An SLO gets a verdict on a variant only when the window holds ``min_samples`` of the values
  it is computed from (requests for the error rate, usable latencies for a percentile); with
  fewer it is neither violated nor met.
- A violation becomes active at the first evaluation that sees it and is lifted
  ``recover_after_s`` after the last evaluation that saw it. Its SLO's actions hold while it
  is active; the admission scale steps down at each evaluation that sees a violation mapped to
  lower_admission, holds while such a violation is active but not seen, and climbs back once
  none is active.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)


class Slo(str, enum.Enum):
    """The objectives the monitor checks (keys of :attr:`QosConfig.actions`)."""

    TTFT_P95 = "ttft_p95"
    ITL_P95 = "itl_p95"
    ERROR_RATE = "error_rate"


class Action(str, enum.Enum):
    """What a violated SLO makes the system do."""

    SHED_BATCH = "shed_batch"            # Routers refuse batch-class requests with 429
    LOWER_ADMISSION = "lower_admission"  # LLMServer replicas scale their queue bounds down
    ALERT = "alert"                      # listed in the report (admin API, metrics)
    ROLLBACK_CANARY = "rollback_canary"  # ask the canary controller to roll back


_DEFAULT_ACTIONS: dict[Slo, tuple[Action, ...]] = {
    Slo.TTFT_P95: (Action.SHED_BATCH, Action.LOWER_ADMISSION, Action.ALERT),
    Slo.ITL_P95: (Action.SHED_BATCH, Action.ALERT),
    Slo.ERROR_RATE: (Action.ALERT, Action.ROLLBACK_CANARY),
}


class SloConfig(BaseModel):
    """The objectives, per variant, and the window they are measured over."""

    model_config = ConfigDict(extra="forbid")

    ttft_p95_s: float | None = Field(
        default=5.0, gt=0.0, description="Ceiling of the p95 time to first token (null: off).")
    itl_p95_s: float | None = Field(
        default=0.5, gt=0.0,
        description="Ceiling of the p95 of requests' mean inter-token latency (null: off).")
    error_rate: float | None = Field(
        default=0.05, ge=0.0, lt=1.0,
        description="Ceiling of the share of failed requests (null: off).")
    window_s: float = Field(default=30.0, gt=0.0,
                            description="Seconds of samples each evaluation looks at.")
    min_samples: int = Field(
        default=20, ge=1,
        description="Values needed in the window before an SLO gets a verdict.")

    def target(self, slo: Slo) -> float | None:
        """The ceiling of an SLO, None when it is switched off."""
        return {Slo.TTFT_P95: self.ttft_p95_s, Slo.ITL_P95: self.itl_p95_s,
                Slo.ERROR_RATE: self.error_rate}[slo]


class QosConfig(BaseModel):
    """The QoS monitor: objectives, the actions their violations trigger, and recovery."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Run the monitor at all.")
    slo: SloConfig = Field(default_factory=SloConfig, description="The objectives.")
    actions: dict[Slo, list[Action]] = Field(
        default_factory=lambda: {slo: list(acts) for slo, acts in _DEFAULT_ACTIONS.items()},
        description="Actions per SLO (ttft_p95, itl_p95, error_rate). SLOs left out keep "
                    "their defaults: ttft_p95 [shed_batch, lower_admission, alert], itl_p95 "
                    "[shed_batch, alert], error_rate [alert, rollback_canary]; [] for none.")
    admission_step: float = Field(
        default=0.5, gt=0.0, lt=1.0,
        description="Each evaluation that sees a lower_admission violation multiplies the "
                    "admission scale by this; once lifted, each evaluation divides by it.")
    admission_floor: float = Field(default=0.25, gt=0.0, le=1.0,
                                   description="Lowest admission scale.")
    admission_step_interval_s: float = Field(
        default=5.0, ge=0.0,
        description="Least time between two changes of a variant's admission scale, so a "
                    "lowered limit has time to show in the window before the next step.")
    recover_after_s: float = Field(
        default=30.0, ge=0.0,
        description="A violation's actions are lifted after this long without it.")
    max_samples_per_variant: int = Field(
        default=20_000, ge=1,
        description="Bound on each variant's window; the oldest samples go first.")

    @field_validator("actions", mode="after")
    @classmethod
    def _fill_defaults(cls, actions: dict[Slo, list[Action]]) -> dict[Slo, list[Action]]:
        return {**{slo: list(acts) for slo, acts in _DEFAULT_ACTIONS.items()}, **actions}


@dataclass(frozen=True, slots=True)
class Directive:
    """What one variant's Routers and LLMServer replicas should do now."""

    shed_batch: bool = False
    admission_scale: float = 1.0

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {"shed_batch": self.shed_batch, "admission_scale": self.admission_scale}

    @classmethod
    def from_dict(cls, data: dict) -> "Directive":
        """Inverse of :meth:`to_dict`."""
        return cls(shed_batch=bool(data["shed_batch"]),
                   admission_scale=float(data["admission_scale"]))


NORMAL = Directive()


@dataclass(frozen=True, slots=True)
class VariantQos:
    """One variant's window as the last evaluation saw it; None where there was no value."""

    samples: int
    errors: int
    ttft_p95_s: float | None
    itl_p95_s: float | None
    error_rate: float | None
    violated: tuple[Slo, ...]  # SLOs this evaluation found violated

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {"samples": self.samples, "errors": self.errors, "ttft_p95_s": self.ttft_p95_s,
                "itl_p95_s": self.itl_p95_s, "error_rate": self.error_rate,
                "violated": [slo.value for slo in self.violated]}


@dataclass(frozen=True, slots=True)
class Alert:
    """An active violation of an SLO mapped to the alert action."""

    slo: Slo
    variant: str
    observed: float       # the value at the last evaluation that saw the violation
    target: float
    since: float          # when it became active (monitor clock)
    last_seen: float      # the last evaluation that saw it

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {**asdict(self), "slo": self.slo.value}


@dataclass(frozen=True, slots=True)
class QosReport:
    """The result of one evaluation."""

    at: float
    variants: dict[str, VariantQos]
    directives: dict[str, Directive]
    alerts: tuple[Alert, ...]
    rollback_canary: str | None  # why the canary should roll back, or None
    changed: bool                # directives differ from the previous evaluation's

    def directive(self, variant: str) -> Directive:
        """A variant's directive (the normal one for a variant the report does not name)."""
        return self.directives.get(variant, NORMAL)

    def to_dict(self) -> dict:
        """JSON-safe form (admin API, publication to replicas)."""
        return {"at": self.at,
                "variants": {v: q.to_dict() for v, q in self.variants.items()},
                "directives": {v: d.to_dict() for v, d in self.directives.items()},
                "alerts": [a.to_dict() for a in self.alerts],
                "rollback_canary": self.rollback_canary,
                "changed": self.changed}


class _Window:
    """One variant's recent samples: a ring buffer of columns, oldest to newest in time.

    ``ttft`` and ``itl`` hold NaN where the request gave no usable latency.
    """

    __slots__ = ("_at", "_ttft", "_itl", "_failed", "_end", "_size")

    def __init__(self, cap: int) -> None:
        self._at = np.empty(cap, dtype=np.float64)
        self._ttft = np.empty(cap, dtype=np.float64)
        self._itl = np.empty(cap, dtype=np.float64)
        self._failed = np.empty(cap, dtype=np.bool_)
        self._end = 0   # where the next sample goes
        self._size = 0

    def add(self, at: float, ttft_s: float | None, itl_s: float | None, error: bool) -> None:
        """Append a sample; when full, the oldest is overwritten."""
        i = self._end
        self._at[i] = at
        self._ttft[i] = _latency(ttft_s, error)
        self._itl[i] = _latency(itl_s, error)
        self._failed[i] = error
        self._end = (i + 1) % self._at.size
        self._size = min(self._size + 1, self._at.size)

    def evict(self, before: float) -> None:
        """Drop samples older than ``before`` (they are recorded in time order)."""
        self._size -= int(np.searchsorted(self._ordered(self._at), before, side="left"))

    def __len__(self) -> int:
        return self._size

    def _ordered(self, column: np.ndarray) -> np.ndarray:
        start = (self._end - self._size) % column.size
        if start + self._size <= column.size:
            return column[start:start + self._size]
        return np.concatenate((column[start:], column[:self._end]))

    def measure(self, min_samples: int,
                targets: dict[Slo, float]) -> tuple[VariantQos, dict[Slo, float]]:
        """The window's statistics, and the SLOs it violates with their observed values."""
        n = self._size
        errors = int(np.count_nonzero(self._ordered(self._failed)))
        ttft, itl = self._ordered(self._ttft), self._ordered(self._itl)
        ttft, itl = ttft[~np.isnan(ttft)], itl[~np.isnan(itl)]
        values = {Slo.TTFT_P95: _p95(ttft), Slo.ITL_P95: _p95(itl),
                  Slo.ERROR_RATE: errors / n if n else None}
        counts = {Slo.TTFT_P95: ttft.size, Slo.ITL_P95: itl.size, Slo.ERROR_RATE: n}
        violated = {slo: values[slo] for slo in Slo
                    if slo in targets and counts[slo] >= min_samples
                    and values[slo] > targets[slo]}
        stats = VariantQos(samples=n, errors=errors, ttft_p95_s=values[Slo.TTFT_P95],
                           itl_p95_s=values[Slo.ITL_P95], error_rate=values[Slo.ERROR_RATE],
                           violated=tuple(violated))
        return stats, violated


def _latency(value: float | None, error: bool) -> float:
    if error or value is None or not math.isfinite(value) or value <= 0.0:
        return math.nan
    return float(value)


def _p95(values: np.ndarray) -> float | None:
    if not values.size:
        return None
    return float(np.quantile(values, 0.95, method="inverted_cdf"))


@dataclass(slots=True)
class _Violation:
    """An active violation of one SLO by one variant."""

    target: float
    observed: float
    since: float
    last_seen: float
    seen_now: bool = True


_SLO_ORDER = {slo: i for i, slo in enumerate(Slo)}


def _by_variant(item: tuple[tuple[str, Slo], _Violation]) -> tuple[str, int]:
    (variant, slo), _ = item
    return variant, _SLO_ORDER[slo]


def _describe(slo: Slo, observed: float, target: float) -> str:
    if slo is Slo.ERROR_RATE:
        return f"error rate {observed:.1%} > {target:.1%}"
    label = "p95 TTFT" if slo is Slo.TTFT_P95 else "p95 ITL"
    return f"{label} {observed:.3g}s > {target:.3g}s"


class QosMonitor:
    """SLOs over sliding windows per variant, and the remediation they call for.

    ``record`` once per finished request, ``evaluate`` on a ticker. Times are on ``clock``'s
    scale; pass ``now`` to use the caller's. Not thread-safe (one event loop).
    """

    def __init__(self, config: QosConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._violations: dict[tuple[str, Slo], _Violation] = {}
        self._scales: dict[str, float] = {}
        self._scaled_at: dict[str, float] = {}  # when each variant's scale last changed
        self._last_directives: dict[str, Directive] = {}  # the non-normal ones

    def record(self, variant: str, ttft_s: float | None, itl_s: float | None, error: bool,
               now: float | None = None) -> None:
        """One finished request of ``variant``; ``error`` when the request failed."""
        if not self.config.enabled:
            return
        window = self._windows.get(variant)
        if window is None:
            window = self._windows[variant] = _Window(self.config.max_samples_per_variant)
        window.add(self._clock() if now is None else now, ttft_s, itl_s, bool(error))

    def evaluate(self, now: float | None = None, canary: str | None = None,
                 stable: str | None = None) -> QosReport:
        """Judge every variant's window, update the active violations and the directives.

        ``canary`` and ``stable`` name the variants of a rollout in progress: the report asks
        for a rollback when the canary violates an SLO mapped to rollback_canary while stable
        has no active violation of that SLO (an overload of both must not roll back the canary;
        a stable with too few samples for a verdict does not count as violating).
        """
        now = self._clock() if now is None else now
        if not self.config.enabled:
            return QosReport(now, {}, {}, (), None, False)
        variants, seen = self._measure(now)
        self._update_violations(now, seen)
        directives = {v: self._directive(v, now) for v in self._known_variants(variants)}
        report = QosReport(
            at=now, variants=variants, directives=directives, alerts=self._alerts(),
            rollback_canary=self._rollback_reason(seen, canary, stable),
            changed=self._note_directives(directives))
        self._forget_idle()
        return report

    # ---- steps of an evaluation ------------------------------------------------------------
    def _measure(self, now: float) -> tuple[dict[str, VariantQos], dict[str, dict[Slo, float]]]:
        slo_cfg = self.config.slo
        targets = {slo: t for slo in Slo if (t := slo_cfg.target(slo)) is not None}
        variants, seen = {}, {}
        for variant, window in sorted(self._windows.items()):
            window.evict(now - slo_cfg.window_s)
            variants[variant], seen[variant] = window.measure(slo_cfg.min_samples, targets)
        return variants, seen

    def _update_violations(self, now: float, seen: dict[str, dict[Slo, float]]) -> None:
        for violation in self._violations.values():
            violation.seen_now = False
        for variant, violated in seen.items():
            for slo, observed in violated.items():
                target = self.config.slo.target(slo)
                current = self._violations.get((variant, slo))
                if current is None:
                    self._violations[(variant, slo)] = _Violation(target, observed, now, now)
                    log.warning("QoS: %s violates %s: %s; actions: %s", variant, slo.value,
                                _describe(slo, observed, target),
                                [a.value for a in self.config.actions[slo]] or "none")
                else:
                    current.observed, current.last_seen, current.seen_now = observed, now, True
        for (variant, slo), violation in list(self._violations.items()):
            if (not violation.seen_now
                    and now - violation.last_seen >= self.config.recover_after_s):
                del self._violations[(variant, slo)]
                log.info("QoS: %s meets %s again (%gs without a violation); actions lifted",
                         variant, slo.value, now - violation.last_seen)

    def _known_variants(self, variants: dict[str, VariantQos]) -> list[str]:
        return sorted(set(variants) | {v for v, _ in self._violations} | set(self._scales))

    def _directive(self, variant: str, now: float) -> Directive:
        cfg = self.config
        active = [(slo, violation) for (v, slo), violation in self._violations.items()
                  if v == variant]
        shed = any(Action.SHED_BATCH in cfg.actions[slo] for slo, _ in active)
        lowering = [violation for slo, violation in active
                    if Action.LOWER_ADMISSION in cfg.actions[slo]]
        scale = before = self._scales.get(variant, 1.0)
        if now - self._scaled_at.get(variant, -float("inf")) >= cfg.admission_step_interval_s:
            if any(violation.seen_now for violation in lowering):
                scale = max(cfg.admission_floor, scale * cfg.admission_step)
            elif not lowering:
                scale = min(1.0, scale / cfg.admission_step)
        if scale != before:
            self._scaled_at[variant] = now
        self._scales[variant] = scale
        return Directive(shed_batch=shed, admission_scale=scale)

    def _alerts(self) -> tuple[Alert, ...]:
        return tuple(Alert(slo, variant, v.observed, v.target, v.since, v.last_seen)
                     for (variant, slo), v in sorted(self._violations.items(), key=_by_variant)
                     if Action.ALERT in self.config.actions[slo])

    def _rollback_reason(self, seen: dict[str, dict[Slo, float]], canary: str | None,
                         stable: str | None) -> str | None:
        if canary is None or canary == stable:
            return None
        for slo, observed in seen.get(canary, {}).items():
            if (Action.ROLLBACK_CANARY in self.config.actions[slo]
                    and (stable, slo) not in self._violations):
                stable_part = "no stable named" if stable is None else f"stable {stable} does not"
                return (f"canary {canary} violates {slo.value} "
                        f"({_describe(slo, observed, self.config.slo.target(slo))}); "
                        f"{stable_part}")
        return None

    def _note_directives(self, directives: dict[str, Directive]) -> bool:
        """Remember the directives; True when they differ from the previous evaluation's."""
        unusual = {v: d for v, d in directives.items() if d != NORMAL}
        changed = unusual != self._last_directives
        if changed:
            for variant in sorted(set(unusual) | set(self._last_directives)):
                before = self._last_directives.get(variant, NORMAL)
                after = unusual.get(variant, NORMAL)
                if before != after:
                    log.info("QoS: %s now shed_batch=%s admission_scale=%g", variant,
                             after.shed_batch, after.admission_scale)
        self._last_directives = unusual
        return changed

    def _forget_idle(self) -> None:
        """Drop the state of variants with no samples, no violation and a normal scale."""
        for variant in [v for v, w in self._windows.items() if not len(w)]:
            del self._windows[variant]
        for variant in [v for v, s in self._scales.items() if s >= 1.0]:
            del self._scales[variant]
            self._scaled_at.pop(variant, None)
