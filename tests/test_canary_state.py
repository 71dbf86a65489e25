"""Tests for mlx_serving.canary.state: the state machine ticked by hand through every
transition (Flagger's advanceCanary tests are the model)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy.stats import norm

from mlx_serving.canary import (AnalysisConfig, Arm, Decision, Phase, Rollout, RolloutPlan,
                                RolloutState, SampleSet, Stage, StateStore)
from mlx_serving.canary.state import INCONCLUSIVE_PAUSE_REASON, Action, TransitionError

PLAN = RolloutPlan(
    stages=[Stage(weight=10, min_samples=200, min_duration_s=60, max_extensions=1),
            Stage(weight=50, min_samples=200, min_duration_s=60, max_extensions=1),
            Stage(weight=100, min_samples=100, min_duration_s=60)],
    analysis=AnalysisConfig(ttft={"margin": 0.2}, itl={"margin": 0.2}, e2e={"margin": 0.2},
                            error_rate={"margin": 0.05}, min_samples=30))


def grid(n: int, median: float, sigma: float = 0.5) -> np.ndarray:
    """Deterministic log-normal 'sample' (quantiles at (i + 0.5) / n)."""
    return median * np.exp(sigma * norm.ppf((np.arange(n) + 0.5) / n))


class Controller:
    """What the real controller does: holds the window's samples, resets them when the
    rollout's stage_epoch changes, and feeds traffic at the current weight."""

    def __init__(self, rollout: Rollout) -> None:
        self.rollout = rollout
        self.stable, self.canary = SampleSet(Arm.STABLE), SampleSet(Arm.CANARY)
        self.epoch = rollout.state.stage_epoch

    def traffic(self, n_canary: int, *, ttft=1.0, error_rate=0.01, itl=True, stable_n=None):
        """n_canary canary requests plus the matching stable ones at the current weight;
        ``ttft`` multiplies the canary's TTFT, ``error_rate`` is the canary's."""
        w = self.rollout.state.weight
        n_stable = stable_n if stable_n is not None else round(n_canary * (100 - w) / w)
        for s, n, factor, rate, with_itl in ((self.stable, n_stable, 1.0, 0.01, True),
                                             (self.canary, n_canary, ttft, error_rate, itl)):
            if n == 0:
                continue
            k = round(n * rate)
            pad = np.full(k, np.nan)
            s.add_arrays(ttft_s=np.concatenate([pad, grid(n - k, 0.2 * factor)]),
                         itl_s=np.concatenate([pad, grid(n - k, 0.03)]) if with_itl else None,
                         e2e_s=np.concatenate([pad, grid(n - k, 4.0)]),
                         error=np.arange(n) < k)

    def tick(self, now: float) -> list[Decision]:
        decisions = self.rollout.advance(now, self.stable, self.canary)
        self.sync()
        return decisions

    def sync(self) -> None:
        if self.rollout.state.stage_epoch != self.epoch:
            self.epoch = self.rollout.state.stage_epoch
            self.stable.reset()
            self.canary.reset()


def started(plan: RolloutPlan = PLAN) -> Controller:
    return Controller(Rollout.start("r1", "model-v1", "model-v2", plan, now=0.0))


def only(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1, decisions
    return decisions[0]


def test_start_enters_the_first_stage():
    c = started()
    s = c.rollout.state
    assert (s.phase, s.stage_index, s.weight, s.stage_epoch) == (Phase.PROGRESSING, 0, 10, 1)
    d = only(c.rollout.history)
    assert (d.action, d.from_phase, d.to_phase, d.weight) == (Action.START, Phase.IDLE,
                                                              Phase.PROGRESSING, 10)
    assert s.effective_stable == "model-v1"


def test_nothing_happens_until_duration_and_samples_are_met():
    c = started()
    c.traffic(200)
    assert c.tick(59.0) == []            # samples met, duration not
    c2 = started()
    c2.traffic(150)
    assert c2.tick(600.0) == []          # duration met, samples not
    assert c.rollout.state.looks == 0 and c.rollout.state.last_analysis is None


def test_a_look_waits_until_both_arms_hold_the_analysis_minimum():
    # a stage min_samples below the analysis's 30 made the look NO_DATA, which extended the
    # stage and threw its samples away, again and again (the run 23 drill on the CPU box)
    plan = RolloutPlan(stages=[Stage(weight=50, min_samples=10, min_duration_s=1),
                               Stage(weight=100, min_samples=10, min_duration_s=1)],
                       analysis=PLAN.analysis)
    c = started(plan)
    c.traffic(20)                        # the stage's 10 met, the analysis's 30 not
    assert c.tick(5.0) == [] and c.rollout.state.looks == 0
    c.traffic(20, stable_n=5)            # canary 40, stable 25: stable still short
    assert c.tick(6.0) == [] and c.rollout.state.looks == 0
    c.traffic(0, stable_n=5)
    d = only(c.tick(7.0))                # the look, on every metric's data
    assert d.evidence["look"] == 1 and "no data" not in d.evidence["reason"]
    assert (d.evidence["n_stable"], d.evidence["n_canary"]) == (30, 40)


def test_aa_is_promoted_through_every_stage():
    c = started()
    c.traffic(200)
    d = only(c.tick(60.0))
    assert (d.action, d.stage, d.weight) == (Action.NEXT_STAGE, 1, 50)
    assert d.evidence["outcome"] == "pass" and d.evidence["look"] == 1
    assert c.canary.n == 0 and c.rollout.state.stage_epoch == 2  # samples reset per stage
    c.traffic(200)
    d = only(c.tick(120.0))
    assert (d.action, d.stage, d.weight) == (Action.NEXT_STAGE, 2, 100)
    assert d.evidence["look"] == 2 and d.evidence["max_looks"] == 4
    c.traffic(100)                     # the bake stage: canary only
    assert c.tick(150.0) == []         # min_duration not yet
    d = only(c.tick(180.0))
    s = c.rollout.state
    assert (d.action, d.to_phase) == (Action.PROMOTE, Phase.PROMOTED)
    assert (s.phase, s.weight, s.promoted_at, s.effective_stable) == (Phase.PROMOTED, 100,
                                                                      180.0, "model-v2")
    assert s.stable_ttft_p95_s == pytest.approx(0.2 * np.exp(0.5 * 1.645), rel=0.02)
    assert c.tick(240.0) == []         # done: nothing more happens


def test_start_then_guard_trip_at_stage_two_rolls_back_at_once():
    c = started()
    c.traffic(200)
    only(c.tick(60.0))
    c.traffic(40, error_rate=0.5)      # 50% errors, >= 20 canary samples, stage not due
    d = only(c.tick(70.0))
    s = c.rollout.state
    assert (d.action, d.from_phase, d.to_phase, d.weight) == (Action.ROLLBACK,
                                                              Phase.PROGRESSING,
                                                              Phase.ROLLED_BACK, 0)
    assert d.evidence["guard"] == "error_rate" and d.evidence["value"] == 0.5
    assert (s.phase, s.weight, s.rolled_back_at, s.stage_index) == (Phase.ROLLED_BACK, 0, 70.0, 1)
    assert s.effective_stable == "model-v1"   # abort moves traffic, stable is unchanged
    assert c.tick(80.0) == []
    with pytest.raises(TransitionError):
        c.rollout.promote(90.0)


def test_significantly_worse_canary_is_rolled_back_by_the_analysis():
    c = started()
    c.traffic(200, ttft=1.5)           # below the 2x p95 guard, clearly worse
    d = only(c.tick(60.0))
    assert d.action is Action.ROLLBACK and d.evidence["outcome"] == "fail"
    ttft = d.evidence["metrics"][0]
    assert ttft["name"] == "ttft" and ttft["verdict"] == "fail"
    assert ttft["ratio"] == pytest.approx(1.5)
    assert c.rollout.state.last_analysis == d.evidence


def test_inconclusive_extends_then_pauses_then_resume_gives_a_fresh_look():
    c = started()
    c.traffic(200, itl=False)          # canary reports no ITL: itl NO_DATA, cannot pass
    d = only(c.tick(60.0))
    s = c.rollout.state
    assert d.action is Action.EXTEND and d.evidence["outcome"] == "inconclusive"
    assert (s.phase, s.extensions_used, s.stage_epoch, s.weight) == (Phase.PROGRESSING, 1, 2, 10)
    assert s.window_elapsed_s(60.0) == 0.0 and c.canary.n == 0
    c.traffic(200, itl=False)
    assert c.tick(100.0) == []         # the extension runs min_duration again
    d = only(c.tick(120.0))
    assert d.action is Action.PAUSE and d.to_phase is Phase.PAUSED
    assert d.reason.startswith(INCONCLUSIVE_PAUSE_REASON)
    assert (s.phase, s.weight, s.pause_kind, s.looks) == (Phase.PAUSED, 10, "inconclusive", 2)
    assert c.tick(500.0) == []         # never promotes by itself
    d = c.rollout.resume(600.0)
    c.sync()
    assert d.action is Action.RESUME and s.stage_epoch == 3 and s.phase is Phase.PROGRESSING
    c.traffic(200)
    assert c.tick(630.0) == []
    d = only(c.tick(660.0))
    assert d.action is Action.NEXT_STAGE and d.evidence["look"] == 3


def test_pause_freezes_weight_and_clock_and_resume_continues_the_stage():
    c = started()
    c.traffic(100)
    assert c.tick(30.0) == []
    d = c.rollout.pause(30.0, "investigating")
    s = c.rollout.state
    assert (d.action, d.to_phase, d.actor, d.reason) == (Action.PAUSE, Phase.PAUSED, "operator",
                                                         "investigating")
    c.traffic(100)                     # traffic keeps flowing at the frozen weight
    assert c.tick(1000.0) == []        # due by samples, but paused: nothing
    assert s.weight == 10 and s.window_elapsed_s(1000.0) == pytest.approx(30.0)
    with pytest.raises(TransitionError):
        c.rollout.pause(1000.0)
    epoch = s.stage_epoch
    d = c.rollout.resume(1030.0)
    c.sync()
    assert d.action is Action.RESUME and s.stage_epoch == epoch and c.canary.n == 200
    assert s.window_elapsed_s(1030.0) == pytest.approx(30.0)
    assert c.tick(1050.0) == []        # 50 s of stage clock
    d = only(c.tick(1060.0))           # 60 s: due, with the samples from before the pause
    assert d.action is Action.NEXT_STAGE and d.evidence["n_canary"] == 200


def test_guards_still_run_while_paused():
    c = started()
    c.rollout.pause(10.0)
    c.traffic(40, error_rate=0.5)
    d = only(c.tick(20.0))
    assert (d.action, d.from_phase, d.to_phase) == (Action.ROLLBACK, Phase.PAUSED,
                                                    Phase.ROLLED_BACK)
    assert c.rollout.state.paused_at is None


def test_operator_promote_next_stage_then_full():
    c = started()
    d = c.rollout.promote(10.0)
    s = c.rollout.state
    assert (d.action, d.stage, d.weight, d.actor) == (Action.NEXT_STAGE, 1, 50, "operator")
    assert s.stage_epoch == 2 and s.looks == 0
    c.rollout.pause(20.0)
    d = c.rollout.promote(30.0, full=True)
    assert (d.action, d.from_phase, d.to_phase, d.weight) == (Action.PROMOTE, Phase.PAUSED,
                                                              Phase.PROMOTED, 100)
    assert s.effective_stable == "model-v2"


def test_operator_promote_from_the_last_stage_promotes():
    c = started()
    c.rollout.promote(1.0)
    c.rollout.promote(2.0)
    assert c.rollout.state.weight == 100 and c.rollout.state.phase is Phase.PROGRESSING
    d = c.rollout.promote(3.0)
    assert d.to_phase is Phase.PROMOTED


def test_operator_rollback():
    c = started()
    d = c.rollout.rollback(5.0, "bad answers reported")
    s = c.rollout.state
    assert (d.action, d.to_phase, d.weight, d.reason) == (Action.ROLLBACK, Phase.ROLLED_BACK, 0,
                                                          "bad answers reported")
    assert s.effective_stable == "model-v1" and s.rolled_back_at == 5.0
    for action in (lambda: c.rollout.rollback(6.0), lambda: c.rollout.pause(6.0),
                   lambda: c.rollout.resume(6.0), lambda: c.rollout.promote(6.0)):
        with pytest.raises(TransitionError):
            action()


def test_pass_without_auto_promote_waits_for_the_operator():
    plan = PLAN.model_copy(update={"stages": [
        PLAN.stages[0].model_copy(update={"auto_promote": False}), *PLAN.stages[1:]]})
    c = started(plan)
    c.traffic(200)
    d = only(c.tick(60.0))
    s = c.rollout.state
    assert d.action is Action.AWAIT_PROMOTION and s.awaiting_promotion
    assert (s.phase, s.stage_index, s.weight) == (Phase.PROGRESSING, 0, 10)
    c.traffic(200)
    assert c.tick(600.0) == []         # waits, no second analysis
    assert s.looks == 1
    d = c.rollout.promote(700.0)
    assert d.action is Action.NEXT_STAGE and not s.awaiting_promotion and s.weight == 50


def test_waiting_for_promotion_still_runs_guards():
    plan = PLAN.model_copy(update={"stages": [
        PLAN.stages[0].model_copy(update={"auto_promote": False}), *PLAN.stages[1:]]})
    c = started(plan)
    c.traffic(200)
    only(c.tick(60.0))
    c.traffic(200, error_rate=0.6)
    assert only(c.tick(61.0)).action is Action.ROLLBACK


def test_restart_continues_at_the_same_stage(tmp_path):
    c = started()
    c.traffic(200)
    only(c.tick(60.0))                 # now in stage 1 (50%)
    c.traffic(120)
    c.rollout.pause(80.0)
    store = StateStore(tmp_path / "rollout.json")
    store.save(c.rollout.state)

    loaded = store.load()              # the controller process restarted
    assert loaded.to_dict() == c.rollout.state.to_dict()
    again = Controller(Rollout(loaded))
    again.epoch = loaded.stage_epoch   # same window; the controller kept its samples
    again.stable, again.canary = c.stable, c.canary
    assert (loaded.phase, loaded.stage_index, loaded.weight) == (Phase.PAUSED, 1, 50)
    again.rollout.resume(200.0)
    assert loaded.window_elapsed_s(200.0) == pytest.approx(20.0)
    again.traffic(80)
    assert again.tick(230.0) == []
    d = only(again.tick(240.0))
    assert (d.action, d.stage, d.weight) == (Action.NEXT_STAGE, 2, 100)
    assert d.evidence["look"] == 2     # the spending index survived the restart


def test_restart_without_samples_waits_for_fresh_ones(tmp_path):
    """A controller that lost its samples simply gathers min_samples again."""
    c = started()
    store = StateStore(tmp_path / "s.json")
    store.save(c.rollout.state)
    r = Rollout(store.load())
    fresh = Controller(r)
    assert fresh.tick(100.0) == []
    fresh.traffic(200)
    assert only(fresh.tick(101.0)).action is Action.NEXT_STAGE


def test_restart_window_after_losing_samples(tmp_path):
    c = started()
    c.traffic(100)
    c.tick(500.0)                       # min_duration long passed, samples not enough
    store = StateStore(tmp_path / "s.json")
    store.save(c.rollout.state)
    fresh = Controller(Rollout(store.load()))   # restarted: samples gone
    d = fresh.rollout.restart_window(600.0)
    fresh.sync()
    s = fresh.rollout.state
    assert d.action is Action.RESTART_WINDOW and s.stage_epoch == 2 and s.stage_index == 0
    fresh.traffic(200)
    assert fresh.tick(630.0) == []      # the clock restarted too
    assert only(fresh.tick(660.0)).action is Action.NEXT_STAGE


def test_idle_state_begins_later_and_arms_are_checked():
    state = RolloutState(rollout_id="r2", stable="a", canary="b", plan=PLAN)
    r = Rollout(state)
    assert state.phase is Phase.IDLE and state.weight == 0
    assert r.advance(1.0, SampleSet(Arm.STABLE), SampleSet(Arm.CANARY)) == []
    d = r.begin(5.0)
    assert (d.action, d.from_phase, state.weight, state.started_at) == (Action.START, Phase.IDLE,
                                                                        10, 5.0)
    with pytest.raises(TransitionError):
        r.begin(6.0)
    with pytest.raises(ValueError):
        r.advance(7.0, SampleSet(Arm.CANARY), SampleSet(Arm.STABLE))


def test_bake_stage_guard_compares_with_the_recorded_stable_p95():
    c = started()
    for t in (60.0, 120.0):
        c.traffic(200)
        only(c.tick(t))
    assert c.rollout.state.weight == 100 and c.rollout.state.stable_ttft_p95_s
    c.traffic(150, ttft=3.0)
    d = only(c.tick(130.0))
    assert d.action is Action.ROLLBACK and d.evidence["guard"] == "ttft_p95"
    assert d.evidence["stable_source"] == "recorded baseline"


def test_decisions_and_state_are_json():
    c = started()
    c.traffic(200)
    c.tick(60.0)
    c.rollout.pause(70.0)
    c.rollout.rollback(80.0, "done")
    for d in c.rollout.history:
        text = json.dumps(d.to_dict(), allow_nan=False)
        assert Decision.from_dict(json.loads(text)) == d
    assert [d.action for d in c.rollout.history] == [Action.START, Action.NEXT_STAGE,
                                                    Action.PAUSE, Action.ROLLBACK]
    state = c.rollout.state
    text = json.dumps(state.to_dict(), allow_nan=False)
    back = RolloutState.from_dict(json.loads(text))
    assert back.to_dict() == state.to_dict() and back.plan == state.plan
    assert len(state.reasons) == 4 and state.reason == "done"


def test_advance_is_cheap_when_nothing_is_due():
    c = started(RolloutPlan())
    rng = np.random.default_rng(0)
    for s in (c.stable, c.canary):
        s.add_arrays(ttft_s=rng.lognormal(-1.6, 0.5, 50_000))
    c.tick(1.0)
    t0 = time.perf_counter()
    for i in range(1000):
        assert c.tick(2.0 + i * 0.5) == []
    assert time.perf_counter() - t0 < 1.0
