"""Monte-Carlo rollouts through :meth:`Rollout.advance` with synthetic traffic (no Ray).

Each tick, ``Poisson(rate x tick)`` requests arrive; each goes to the canary with probability
weight/100 (what hashing random keys does). A request fails with the arm's error rate; a
successful one gets log-normal TTFT, ITL and e2e (median x arm factor, log-SD sigma), i.e.
normal log latencies. The analysis only uses each arm's n, mean and sum of squared deviations
of the logs, so by default a tick adds those, drawn from their exact joint distribution
(mean ~ N(mu, sigma^2/k), M2 ~ sigma^2 chi2(k-1), independent), instead of k values:
identical statistics at a fraction of the cost. ``per_request=True`` draws every request.
Guards are off unless the plan given says otherwise, so what is measured is the statistics.
Deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlx_serving.canary.guards import GuardConfig
from mlx_serving.canary.plan import RolloutPlan
from mlx_serving.canary.samples import Arm, Moments, SampleSet
from mlx_serving.canary.state import Phase, Rollout


class SimulationParams(BaseModel):
    """Synthetic traffic. Defaults: an A/A test (canary identical to stable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_rate_rps: float = Field(default=20.0, gt=0.0, description="Requests per second.")
    tick_s: float = Field(default=60.0, gt=0.0, description="Seconds between advance() calls.")
    ttft_median_s: float = Field(default=0.2, gt=0.0, description="Stable TTFT median.")
    ttft_sigma: float = Field(default=0.5, gt=0.0, description="SD of ln TTFT.")
    itl_median_s: float = Field(default=0.03, gt=0.0, description="Stable ITL median.")
    itl_sigma: float = Field(default=0.3, gt=0.0, description="SD of ln ITL.")
    e2e_median_s: float = Field(default=4.0, gt=0.0, description="Stable e2e median.")
    e2e_sigma: float = Field(default=0.4, gt=0.0, description="SD of ln e2e.")
    error_rate: float = Field(default=0.01, ge=0.0, lt=1.0, description="Stable error rate.")
    canary_ttft_factor: float = Field(default=1.0, gt=0.0, description="Canary TTFT median x.")
    canary_itl_factor: float = Field(default=1.0, gt=0.0, description="Canary ITL median x.")
    canary_e2e_factor: float = Field(default=1.0, gt=0.0, description="Canary e2e median x.")
    canary_error_rate: float | None = Field(
        default=None, ge=0.0, lt=1.0, description="Canary error rate; None = stable's.")
    per_request: bool = Field(
        default=False,
        description="Draw every request's latencies (slow). Default: draw each tick's "
                    "per-arm mean and sum of squares of the log latencies from their exact "
                    "distributions (same statistics, ~100x faster; no quantiles, so guards "
                    "on latency cannot run).")
    max_time_s: float = Field(
        default=14 * 86400.0, gt=0.0, description="Give up (outcome 'timeout') after this.")


@dataclass(slots=True)
class RunResult:
    """One simulated rollout."""

    outcome: str            # "rolled_back", "promoted", "paused" or "timeout"
    stage: int              # stage index where it was decided
    time_s: float           # simulated seconds from start to the decision
    canary_samples: int     # canary samples over the whole rollout
    total_samples: int      # all samples over the whole rollout
    looks: int              # analyses made
    extensions: int         # INCONCLUSIVE extensions over all stages


@dataclass(slots=True)
class SimulationSummary:
    """Shares and medians over many runs (``to_dict`` for docs and tests)."""

    runs: int
    rolled_back: float      # shares of runs
    promoted: float
    paused: float
    timeout: float
    decided_stage: dict     # outcome -> {stage index: runs}
    median_canary_samples: float
    median_total_samples: float
    median_time_s: float
    extended_runs: float    # share of runs that extended some stage at least once
    params: dict = field(default_factory=dict)
    results: list[RunResult] = field(default_factory=list, repr=False)

    def share_rolled_back_by(self, stage_index: int) -> float:
        """Share of runs rolled back at or before ``stage_index``."""
        return sum(1 for r in self.results
                   if r.outcome == "rolled_back" and r.stage <= stage_index) / self.runs

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("results")
        return out


def simulation_plan(plan: RolloutPlan | None = None) -> RolloutPlan:
    """``plan`` (default: the default plan) with every guard switched off."""
    plan = plan if plan is not None else RolloutPlan()
    return plan.model_copy(update={"guards": GuardConfig(enabled=False)})


class _Traffic:
    """Draws one tick of samples for both arms into SampleSets (log scale)."""

    def __init__(self, p: SimulationParams, rng: np.random.Generator) -> None:
        self.p, self.rng = p, rng
        self.arms = {
            Arm.STABLE: (p.error_rate,
                         np.log([p.ttft_median_s, p.itl_median_s, p.e2e_median_s])),
            Arm.CANARY: (p.error_rate if p.canary_error_rate is None else p.canary_error_rate,
                         np.log([p.ttft_median_s * p.canary_ttft_factor,
                                 p.itl_median_s * p.canary_itl_factor,
                                 p.e2e_median_s * p.canary_e2e_factor])),
        }
        self.sigmas = np.array([p.ttft_sigma, p.itl_sigma, p.e2e_sigma])

    def tick(self, weight_pct: float, sets: dict[Arm, SampleSet]) -> tuple[int, int]:
        rng = self.rng
        total = int(rng.poisson(self.p.request_rate_rps * self.p.tick_s))
        n_c = int(rng.binomial(total, weight_pct / 100.0))
        for arm, n in ((Arm.STABLE, total - n_c), (Arm.CANARY, n_c)):
            if n == 0:
                continue
            rate, mus = self.arms[arm]
            errors = int(rng.binomial(n, rate))
            ok = n - errors
            if self.p.per_request:
                logs = rng.standard_normal((3, ok)) * self.sigmas[:, None] + mus[:, None]
                sets[arm].add_log_arrays(n=n, errors=errors, ttft=logs[0], itl=logs[1],
                                         e2e=logs[2])
                continue
            # The mean and M2 of ok i.i.d. N(mu, sigma^2) values, drawn exactly:
            # mean ~ N(mu, sigma^2 / ok), M2 ~ sigma^2 chi2(ok - 1), independent.
            means = mus + self.sigmas * rng.standard_normal(3) / math.sqrt(max(ok, 1))
            m2 = (self.sigmas ** 2 * rng.chisquare(ok - 1, 3) if ok > 1 else np.zeros(3))
            ttft, itl, e2e = (Moments(ok, float(means[i]), float(m2[i])) for i in range(3))
            sets[arm].add_log_moments(n=n, errors=errors, ttft=ttft, itl=itl, e2e=e2e)
        return total, n_c


def simulate_rollout(params: SimulationParams, plan: RolloutPlan,
                     rng: np.random.Generator) -> RunResult:
    """Run one rollout until PROMOTED, ROLLED_BACK, PAUSED (operator needed) or timeout."""
    rollout = Rollout.start("sim", "stable", "canary", plan, now=0.0)
    sets = {Arm.STABLE: SampleSet(Arm.STABLE), Arm.CANARY: SampleSet(Arm.CANARY)}
    traffic = _Traffic(params, rng)
    state = rollout.state
    epoch = state.stage_epoch
    now = total = canary = 0
    while now < params.max_time_s:
        t, c = traffic.tick(state.weight, sets)
        total, canary = total + t, canary + c
        now += params.tick_s
        rollout.advance(now, sets[Arm.STABLE], sets[Arm.CANARY])
        if state.stage_epoch != epoch:
            epoch = state.stage_epoch
            sets[Arm.STABLE].reset()
            sets[Arm.CANARY].reset()
        if state.phase is not Phase.PROGRESSING:
            break
    outcome = {Phase.PROMOTED: "promoted", Phase.ROLLED_BACK: "rolled_back",
               Phase.PAUSED: "paused"}.get(state.phase, "timeout")
    extensions = sum(1 for d in rollout.history if d.action.value == "extend")
    return RunResult(outcome, state.stage_index, float(now), canary, total, state.looks,
                     extensions)


def simulate(runs: int, params: SimulationParams | None = None,
             plan: RolloutPlan | None = None, seed: int = 0) -> SimulationSummary:
    """``runs`` independent rollouts (seeded); ``plan`` defaults to the default plan with
    guards off (:func:`simulation_plan`)."""
    params = params if params is not None else SimulationParams()
    plan = plan if plan is not None else simulation_plan()
    rng = np.random.default_rng(seed)
    results = [simulate_rollout(params, plan, rng) for _ in range(runs)]

    def share(outcome: str) -> float:
        return sum(1 for r in results if r.outcome == outcome) / runs

    stages: dict[str, dict[int, int]] = {}
    for r in results:
        by = stages.setdefault(r.outcome, {})
        by[r.stage] = by.get(r.stage, 0) + 1
    return SimulationSummary(
        runs=runs, rolled_back=share("rolled_back"), promoted=share("promoted"),
        paused=share("paused"), timeout=share("timeout"),
        decided_stage={k: dict(sorted(v.items())) for k, v in sorted(stages.items())},
        median_canary_samples=float(np.median([r.canary_samples for r in results])),
        median_total_samples=float(np.median([r.total_samples for r in results])),
        median_time_s=float(np.median([r.time_s for r in results])),
        extended_runs=sum(1 for r in results if r.extensions) / runs,
        params={"seed": seed, **params.model_dump(mode="json")},
        results=results)
