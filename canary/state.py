"""The rollout state machine: a persisted status record and a controller you tick by hand.

::

    IDLE --start--> PROGRESSING (stage 0) --PASS--> next stage ... --PASS at the last--> PROMOTED
                      |   ^   |  \\--INCONCLUSIVE--> extend (fresh look), or when the stage's
                      |   |   |                     extensions are used up: PAUSED
                      |   |   \\--FAIL or guard tripped--> ROLLED_BACK (weight 0)
               pause  |   | resume
                      v   |
                      PAUSED (weight and stage clock frozen; guards still run)

Operators may also ``promote`` (next stage, or ``full`` to PROMOTED) and ``rollback`` at any
time the rollout is live; a restarted controller that lost its samples calls
``restart_window``. Every transition returns a :class:`Decision` for the audit log.

Samples are per *look window*: a window starts when a stage starts, when an INCONCLUSIVE stage
is extended, and when an operator resumes a stage paused as inconclusive. Earlier windows'
samples never carry over, so every analysis is made on fresh, independent data, which is what
makes the alpha spending over looks valid (docs/CANARY_STATS.md). ``state.stage_epoch`` is
incremented at every new window: when it changes, the caller resets its sample sets.

Abort moves traffic; it does not change what "stable" means. After PROMOTED the canary
variant *is* the stable one (``state.effective_stable``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mlx_serving.canary.guards import check_guards
from mlx_serving.canary.plan import RolloutPlan, Stage
from mlx_serving.canary.samples import Arm, SampleSet
from mlx_serving.canary.stats import Outcome, analyze

SCHEMA_VERSION = 1
MAX_REASONS = 100
INCONCLUSIVE_PAUSE_REASON = "inconclusive: operator decision needed"


class Phase(str, enum.Enum):
    """Where a rollout is in its life."""

    IDLE = "idle"                # created, not started; canary weight 0
    PROGRESSING = "progressing"  # a stage is running (or waiting for an operator's promote)
    PAUSED = "paused"            # weight and stage clock frozen until resume/promote/rollback
    PROMOTED = "promoted"        # done: canary weight 100, the canary is the stable variant
    ROLLED_BACK = "rolled_back"  # done: canary weight 0, stable unchanged


LIVE_PHASES = (Phase.PROGRESSING, Phase.PAUSED)


class Action(str, enum.Enum):
    """What a Decision did."""

    START = "start"
    NEXT_STAGE = "next_stage"            # entered the next stage (new weight)
    EXTEND = "extend"                    # INCONCLUSIVE: new look window, same stage
    AWAIT_PROMOTION = "await_promotion"  # PASS on a stage with auto_promote=False
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"                  # to PROMOTED (weight 100)
    ROLLBACK = "rollback"                # to ROLLED_BACK (weight 0)
    RESTART_WINDOW = "restart_window"    # fresh samples in the same stage (controller restart)


class TransitionError(ValueError):
    """An operator action that the current phase does not allow (map to HTTP 409)."""


@dataclass(slots=True)
class Decision:
    """One transition, as written to the audit log."""

    at: float
    action: Action
    from_phase: Phase
    to_phase: Phase
    stage: int          # stage index after the transition
    weight: float       # canary weight (percent) after the transition
    reason: str
    evidence: dict = field(default_factory=dict)   # Analysis.to_dict(), GuardTrip, ...
    rollout_id: str = ""
    actor: str = "controller"                      # "controller" or "operator"
    stage_epoch: int = 0                           # look window after the transition

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {"at": self.at, "action": self.action.value, "from_phase": self.from_phase.value,
                "to_phase": self.to_phase.value, "stage": self.stage, "weight": self.weight,
                "reason": self.reason, "evidence": self.evidence, "rollout_id": self.rollout_id,
                "actor": self.actor, "stage_epoch": self.stage_epoch}

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        """Inverse of :meth:`to_dict`."""
        return cls(at=d["at"], action=Action(d["action"]), from_phase=Phase(d["from_phase"]),
                   to_phase=Phase(d["to_phase"]), stage=d["stage"], weight=d["weight"],
                   reason=d["reason"], evidence=d.get("evidence") or {},
                   rollout_id=d.get("rollout_id", ""), actor=d.get("actor", "controller"),
                   stage_epoch=d.get("stage_epoch", 0))


@dataclass(slots=True)
class RolloutState:
    """Everything needed to continue a rollout after a restart (``to_dict``/``from_dict``)."""

    rollout_id: str
    stable: str                     # stable variant name (unchanged by a rollback)
    canary: str                     # canary variant name
    plan: RolloutPlan
    phase: Phase = Phase.IDLE
    stage_index: int = 0
    weight: float = 0.0             # canary weight in percent, what the Router applies
    stage_epoch: int = 0            # +1 at every new look window: reset the sample sets
    stage_started_at: float | None = None   # when the current stage began
    window_started_at: float | None = None  # when the current look window began
    window_paused_s: float = 0.0    # paused seconds inside the current window
    paused_at: float | None = None  # set while PAUSED
    pause_kind: str | None = None   # "operator" or "inconclusive" while PAUSED
    extensions_used: int = 0        # in the current stage
    looks: int = 0                  # analyses done in this rollout (the alpha-spending index)
    awaiting_promotion: bool = False
    reason: str = ""                # reason of the last transition
    reasons: list[str] = field(default_factory=list)  # recent transition reasons, oldest first
    created_at: float | None = None
    started_at: float | None = None
    updated_at: float | None = None
    promoted_at: float | None = None
    rolled_back_at: float | None = None
    last_analysis: dict | None = None
    stable_ttft_p95_s: float | None = None  # stable's p95 TTFT at the last stage change
    schema_version: int = SCHEMA_VERSION

    @property
    def effective_stable(self) -> str:
        """The variant that is "stable" now: the canary once PROMOTED."""
        return self.canary if self.phase is Phase.PROMOTED else self.stable

    @property
    def stage(self) -> Stage:
        """The current stage."""
        return self.plan.stages[self.stage_index]

    @property
    def done(self) -> bool:
        """PROMOTED or ROLLED_BACK."""
        return self.phase in (Phase.PROMOTED, Phase.ROLLED_BACK)

    def window_elapsed_s(self, now: float) -> float:
        """Seconds the current look window has run, pauses excluded (the stage clock)."""
        if self.window_started_at is None:
            return 0.0
        paused = self.window_paused_s + (now - self.paused_at if self.paused_at is not None
                                         else 0.0)
        return max(0.0, now - self.window_started_at - paused)

    def to_dict(self) -> dict:
        """JSON-safe form."""
        return {
            "schema_version": self.schema_version, "rollout_id": self.rollout_id,
            "stable": self.stable, "canary": self.canary,
            "plan": self.plan.model_dump(mode="json"), "phase": self.phase.value,
            "stage_index": self.stage_index, "weight": self.weight,
            "stage_epoch": self.stage_epoch, "stage_started_at": self.stage_started_at,
            "window_started_at": self.window_started_at,
            "window_paused_s": self.window_paused_s, "paused_at": self.paused_at,
            "pause_kind": self.pause_kind, "extensions_used": self.extensions_used,
            "looks": self.looks, "awaiting_promotion": self.awaiting_promotion,
            "reason": self.reason, "reasons": list(self.reasons),
            "created_at": self.created_at, "started_at": self.started_at,
            "updated_at": self.updated_at, "promoted_at": self.promoted_at,
            "rolled_back_at": self.rolled_back_at, "last_analysis": self.last_analysis,
            "stable_ttft_p95_s": self.stable_ttft_p95_s,
            "effective_stable": self.effective_stable,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RolloutState":
        """Inverse of :meth:`to_dict` (``effective_stable`` is derived, not read)."""
        version = d.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported rollout state schema_version {version}")
        return cls(
            rollout_id=d["rollout_id"], stable=d["stable"], canary=d["canary"],
            plan=RolloutPlan.model_validate(d["plan"]), phase=Phase(d["phase"]),
            stage_index=d["stage_index"], weight=d["weight"], stage_epoch=d["stage_epoch"],
            stage_started_at=d.get("stage_started_at"),
            window_started_at=d.get("window_started_at"),
            window_paused_s=d.get("window_paused_s", 0.0), paused_at=d.get("paused_at"),
            pause_kind=d.get("pause_kind"), extensions_used=d.get("extensions_used", 0),
            looks=d.get("looks", 0), awaiting_promotion=d.get("awaiting_promotion", False),
            reason=d.get("reason", ""), reasons=list(d.get("reasons", [])),
            created_at=d.get("created_at"), started_at=d.get("started_at"),
            updated_at=d.get("updated_at"), promoted_at=d.get("promoted_at"),
            rolled_back_at=d.get("rolled_back_at"), last_analysis=d.get("last_analysis"),
            stable_ttft_p95_s=d.get("stable_ttft_p95_s"), schema_version=version)


class Rollout:
    """The tickable state machine around a :class:`RolloutState`.

    ``Rollout(state)`` continues a loaded state; :meth:`start` begins a new one. Call
    :meth:`advance` every tick (about once a second) with the current window's samples; it
    costs a few comparisons unless a guard must be checked against new samples or the
    window is due for its analysis. Decisions made by this object are kept in ``history``
    (and returned by each call) for the caller to append to the audit log.
    """

    def __init__(self, state: RolloutState) -> None:
        if not 0 <= state.stage_index < len(state.plan.stages):
            raise ValueError(f"stage_index {state.stage_index} outside the plan")
        self.state = state
        self.history: list[Decision] = []
        self._last_stable: SampleSet | None = None

    # ---- creation --------------------------------------------------------------------
    @classmethod
    def start(cls, rollout_id: str, stable: str, canary: str, plan: RolloutPlan | None = None,
              now: float = 0.0) -> "Rollout":
        """A new rollout, started at ``now`` in the first stage (its Decision is in
        ``history``)."""
        state = RolloutState(rollout_id=rollout_id, stable=stable, canary=canary,
                             plan=plan if plan is not None else RolloutPlan(), created_at=now)
        rollout = cls(state)
        rollout.begin(now)
        return rollout

    def begin(self, now: float, reason: str = "") -> Decision:
        """IDLE -> PROGRESSING in the first stage (what :meth:`start` does; use it for a
        state created IDLE and started later)."""
        s = self.state
        if s.phase is not Phase.IDLE:
            raise TransitionError(f"cannot start a {s.phase.value} rollout")
        s.started_at = now
        return self._enter_stage(now, 0, Action.START,
                                 reason or f"rollout started: {s.canary} vs {s.stable}", {},
                                 "operator")

    # ---- the tick --------------------------------------------------------------------
    def advance(self, now: float, stable_samples: SampleSet,
                canary_samples: SampleSet) -> list[Decision]:
        """One tick: guards first (roll back at once), then, if the window is due (its
        min_duration and min_samples met, and for an analysis the analysis's min_samples in
        both arms), the analysis and its transition."""
        s = self.state
        if s.phase not in LIVE_PHASES:
            return []
        if stable_samples.arm is not Arm.STABLE or canary_samples.arm is not Arm.CANARY:
            raise ValueError("advance(now, stable_samples, canary_samples): arms swapped")
        self._last_stable = stable_samples
        trip = check_guards(stable_samples, canary_samples, s.plan.guards,
                            stable_ttft_p95_s=s.stable_ttft_p95_s)
        if trip is not None:
            return [self._finish(now, Phase.ROLLED_BACK, f"guard {trip.guard}: {trip.reason}",
                                 trip.to_dict(), "controller")]
        if s.phase is Phase.PAUSED or s.awaiting_promotion:
            return []
        stage = s.stage
        if (canary_samples.n < (stage.min_samples or 0)
                or s.window_elapsed_s(now) < stage.min_duration_s):
            return []
        if not stage.comparative:  # the bake stage: no control arm, guards only
            reason = (f"stage {s.stage_index} ({stage.weight:g}%) baked "
                      f"{s.window_elapsed_s(now):.0f}s with {canary_samples.n} samples")
            evidence = {"n_canary": canary_samples.n, "errors": canary_samples.errors}
            return [self._passed(now, reason, evidence)]
        if min(stable_samples.n, canary_samples.n) < s.plan.analysis.min_samples:
            # every metric would be NO_DATA: the look could only spend an extension and
            # throw this window's samples away (a stage min_samples below the analysis's,
            # or a canary weight above 50% that leaves stable short)
            return []
        s.looks += 1
        analysis = analyze(stable_samples, canary_samples, s.plan.analysis, s.looks,
                           s.plan.max_looks, stage.weight / 100.0,
                           looks_per_stage=1 + stage.max_extensions)
        s.last_analysis = evidence = analysis.to_dict()
        if analysis.outcome is Outcome.FAIL:
            return [self._finish(now, Phase.ROLLED_BACK, f"analysis failed: {analysis.reason}",
                                 evidence, "controller")]
        if analysis.outcome is Outcome.PASS:
            return [self._passed(now, f"analysis passed: {analysis.reason}", evidence)]
        if s.extensions_used < stage.max_extensions:
            s.extensions_used += 1
            return [self._new_window(now, Action.EXTEND, Phase.PROGRESSING,
                                     f"inconclusive, extension {s.extensions_used}/"
                                     f"{stage.max_extensions}: {analysis.reason}",
                                     evidence, "controller")]
        s.paused_at, s.pause_kind = now, "inconclusive"
        return [self._record(now, Action.PAUSE, Phase.PAUSED,
                             f"{INCONCLUSIVE_PAUSE_REASON} (after {stage.max_extensions} "
                             f"extensions): {analysis.reason}", evidence, "controller")]

    # ---- operator actions -------------------------------------------------------------
    def restart_window(self, now: float, reason: str = "") -> Decision:
        """Start a fresh look window in the current stage (new stage_epoch, stage clock at
        0, extensions and looks unchanged). For a controller that restarted and lost its
        in-memory samples: without it the next look would come as soon as min_samples are
        gathered again, since the old window's min_duration has passed."""
        s = self.state
        if s.phase not in LIVE_PHASES:
            raise TransitionError(f"cannot restart the window of a {s.phase.value} rollout")
        if s.paused_at is not None:
            s.paused_at = now
        return self._new_window(now, Action.RESTART_WINDOW, s.phase,
                                reason or "look window restarted (samples lost)", {},
                                "controller")

    def pause(self, now: float, reason: str = "") -> Decision:
        """Freeze the weight and the stage clock (guards keep running)."""
        s = self.state
        if s.phase is not Phase.PROGRESSING:
            raise TransitionError(f"cannot pause a {s.phase.value} rollout")
        s.paused_at, s.pause_kind = now, "operator"
        return self._record(now, Action.PAUSE, Phase.PAUSED, reason or "paused by operator",
                            {}, "operator")

    def resume(self, now: float, reason: str = "") -> Decision:
        """Continue the paused stage with the samples already gathered and the clock where
        it stopped. A stage paused as inconclusive instead gets a fresh look window (its
        samples were analysed already): the caller resets its samples (stage_epoch)."""
        s = self.state
        if s.phase is not Phase.PAUSED:
            raise TransitionError(f"cannot resume a {s.phase.value} rollout")
        kind = s.pause_kind
        s.window_paused_s += now - (s.paused_at if s.paused_at is not None else now)
        s.paused_at, s.pause_kind = None, None
        if kind == "inconclusive":
            return self._new_window(now, Action.RESUME, Phase.PROGRESSING,
                                    reason or "resumed by operator: fresh look window", {},
                                    "operator")
        return self._record(now, Action.RESUME, Phase.PROGRESSING,
                            reason or "resumed by operator", {}, "operator")

    def promote(self, now: float, full: bool = False, reason: str = "") -> Decision:
        """Operator promote: the next stage, or with ``full`` (or from the last stage)
        straight to PROMOTED. Allowed while PROGRESSING or PAUSED."""
        s = self.state
        if s.phase not in LIVE_PHASES:
            raise TransitionError(f"cannot promote a {s.phase.value} rollout")
        self._clear_pause(now)
        if full or s.stage_index + 1 >= len(s.plan.stages):
            return self._finish(now, Phase.PROMOTED, reason or "promoted by operator", {},
                                "operator")
        self._remember_baseline()
        return self._enter_stage(now, s.stage_index + 1, Action.NEXT_STAGE,
                                 reason or "next stage by operator", {}, "operator")

    def rollback(self, now: float, reason: str = "") -> Decision:
        """Operator rollback: canary weight 0, phase ROLLED_BACK (stable is unchanged)."""
        s = self.state
        if s.phase not in (*LIVE_PHASES, Phase.IDLE):
            raise TransitionError(f"cannot roll back a {s.phase.value} rollout")
        self._clear_pause(now)
        return self._finish(now, Phase.ROLLED_BACK, reason or "rolled back by operator", {},
                            "operator")

    # ---- internals --------------------------------------------------------------------
    def _passed(self, now: float, reason: str, evidence: dict) -> Decision:
        s = self.state
        if not s.stage.auto_promote:
            s.awaiting_promotion = True
            return self._record(now, Action.AWAIT_PROMOTION, Phase.PROGRESSING,
                                f"{reason}; waiting for an operator's promote", evidence,
                                "controller")
        if s.stage_index + 1 >= len(s.plan.stages):
            return self._finish(now, Phase.PROMOTED, reason, evidence, "controller")
        self._remember_baseline()
        return self._enter_stage(now, s.stage_index + 1, Action.NEXT_STAGE, reason, evidence,
                                 "controller")

    def _remember_baseline(self) -> None:
        """Keep stable's p95 TTFT for the ttft guard of a stage without a control arm."""
        stable = self._last_stable
        guards = self.state.plan.guards
        if not (guards.enabled and guards.ttft_p95.enabled):
            return
        if stable is not None and stable.count("ttft") >= guards.ttft_p95.min_samples:
            self.state.stable_ttft_p95_s = stable.quantile("ttft", 0.95)

    def _enter_stage(self, now: float, index: int, action: Action, reason: str,
                     evidence: dict, actor: str) -> Decision:
        s = self.state
        s.stage_index = index
        s.weight = s.plan.stages[index].weight
        s.stage_started_at = now
        s.extensions_used = 0
        s.awaiting_promotion = False
        return self._new_window(now, action, Phase.PROGRESSING, reason, evidence, actor)

    def _new_window(self, now: float, action: Action, to_phase: Phase, reason: str,
                    evidence: dict, actor: str) -> Decision:
        s = self.state
        s.stage_epoch += 1
        s.window_started_at = now
        s.window_paused_s = 0.0
        return self._record(now, action, to_phase, reason, evidence, actor)

    def _clear_pause(self, now: float) -> None:
        s = self.state
        if s.paused_at is not None:
            s.window_paused_s += now - s.paused_at
        s.paused_at, s.pause_kind = None, None

    def _finish(self, now: float, phase: Phase, reason: str, evidence: dict,
                actor: str) -> Decision:
        s = self.state
        s.paused_at, s.pause_kind = None, None
        s.awaiting_promotion = False
        if phase is Phase.PROMOTED:
            s.weight, s.promoted_at = 100.0, now
        else:
            s.weight, s.rolled_back_at = 0.0, now
        return self._record(now, Action.PROMOTE if phase is Phase.PROMOTED else Action.ROLLBACK,
                            phase, reason, evidence, actor)

    def _record(self, now: float, action: Action, to_phase: Phase, reason: str,
                evidence: dict, actor: str) -> Decision:
        s = self.state
        decision = Decision(at=now, action=action, from_phase=s.phase, to_phase=to_phase,
                            stage=s.stage_index, weight=s.weight, reason=reason,
                            evidence=evidence, rollout_id=s.rollout_id, actor=actor,
                            stage_epoch=s.stage_epoch)
        s.phase = to_phase
        s.reason = reason
        s.updated_at = now
        s.reasons.append(f"{now:.3f} {action.value}: {reason}")
        del s.reasons[:-MAX_REASONS]
        self.history.append(decision)
        return decision
