"""RolloutController: the one replica that owns the canary rollout.

It runs the rollout state machine from ``mlx_serving.canary``, gathers samples from every
Router replica, persists its state (atomic writes) and an audit log of every decision, and
publishes the routing table that Routers follow (long-poll, so a rollback reaches them
within one routing update). Operator commands arrive through the Router's /admin API.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from ray import serve

from mlx_serving.canary import (Arm, AuditLog, Flag, FlagSet, Phase, Rollout, RolloutPlan,
                                Sample, SampleSet, StateStore)
from mlx_serving.canary.store import atomic_write_text
from mlx_serving.deployments.errors import HTTPError, bad_request
from mlx_serving.deployments.qos import QosMonitor, QosReport
from mlx_serving.deployments.settings import AppConfig
from mlx_serving.deployments.telemetry import QosMetrics, Reporter, route_logs_to_serve

log = logging.getLogger(__name__)

_ACTIVE = (Phase.PROGRESSING, Phase.PAUSED)


def _conflict(message: str) -> HTTPError:
    return HTTPError(409, message, type="conflict_error", code="rollout_conflict")


# A replaced controller must not hold the Routers' long-polls for Serve's default 20 s
# graceful shutdown: they would keep routing by its last table meanwhile.
@serve.deployment(name="RolloutController", num_replicas=1, max_ongoing_requests=10_000,
                  graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=1,
                  ray_actor_options={"num_cpus": 0.05})
class RolloutController:
    """Owns the rollout state machine, its samples, its persisted state and the routing table.

    Every method callers reach is ``async``: Serve runs a deployment's sync methods in a
    thread pool, and this state (and the asyncio Event the long-polls wait on) must only
    change on the replica's event loop, where the ticker and ``record`` also run.
    """

    def __init__(self, config: dict, telemetry=None):
        route_logs_to_serve(access_log=False)
        cfg = AppConfig.model_validate(config)
        self._variants = set(cfg.variants)
        self._config_stable = cfg.stable
        self._canary_cfg = cfg.canary
        root = Path(cfg.canary.state_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        self._store = StateStore(root / "rollout.json")
        self._audit = AuditLog(root / "audit.jsonl")
        self._flags_path = root / "flags.json"
        state = self._store.load()
        self._rollout = Rollout(state) if state is not None else None
        if state is not None and state.phase in _ACTIVE:
            # Samples died with the old replica: the stage continues with a fresh look window
            # (its min_duration and min_samples again), so no look runs on a thin sample.
            self._audit.append(self._rollout.restart_window(time.time()))
            self._store.save(state)
        self._flags = (FlagSet.from_json(self._flags_path.read_text())
                       if self._flags_path.exists() else FlagSet())
        self._arms = self._fresh_samples()
        self._epoch = state.stage_epoch if state is not None else None
        self._version = time.time_ns()  # monotonic across controller restarts
        self._changed: asyncio.Event | None = None
        self._ticker: asyncio.Task | None = None
        self._qos = QosMonitor(cfg.qos)
        self._qos_report: QosReport | None = None
        self._qos_metrics = QosMetrics()
        self._reporter = None
        if telemetry is not None:
            self._reporter = Reporter(telemetry, "controller", self._qos_metrics.registry).start()

    @staticmethod
    def _fresh_samples() -> dict[Arm, SampleSet]:
        return {Arm.STABLE: SampleSet(Arm.STABLE), Arm.CANARY: SampleSet(Arm.CANARY)}

    # -- routing ------------------------------------------------------------------------------------
    def _effective_stable(self) -> str:
        """The variant that is stable now.

        The last rollout decides (its canary once promoted, else the stable it started
        from: a rollback never changes what stable means), and that holds across restarts
        and redeploys of the config. An operator who sets the config's stable variant to one
        the last rollout did not involve makes the config win.
        """
        st = self._rollout.state if self._rollout else None
        if (st is not None and self._config_stable in (st.stable, st.canary)
                and st.effective_stable in self._variants):
            return st.effective_stable
        return self._config_stable

    def _table(self) -> dict:
        st = self._rollout.state if self._rollout else None
        active = st is not None and st.phase in _ACTIVE
        return {"version": self._version,
                "rollout_id": st.rollout_id if st else None,
                "stable": self._effective_stable(),
                "canary": st.canary if active else None,
                "weight": st.weight if active else 0.0,
                "epoch": st.stage_epoch if st else 0,
                "flags": self._flags.to_dict(),
                "qos": ({v: d.to_dict() for v, d in self._qos_report.directives.items()}
                        if self._qos_report else {})}

    def _publish(self) -> None:
        self._version = max(self._version + 1, time.time_ns())
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _ensure_ticking(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def routing(self) -> dict:
        self._ensure_ticking()
        return self._table()

    async def wait_for_change(self, version: int, timeout_s: float) -> dict:
        """Long-poll: returns the table once its version differs from ``version``."""
        self._ensure_ticking()
        if version == self._version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self._table()

    # -- samples and ticking --------------------------------------------------------------------------
    async def record(self, batch: list[dict]) -> int:
        """Samples from a Router: every one feeds the QoS monitor; for the rollout, those of
        another stage or rollout are dropped. Returns the rollout samples kept."""
        self._ensure_ticking()
        for s in batch:
            self._qos.record(s["variant"], s["ttft_s"], s["itl_s"], s["error"])
        st = self._rollout.state if self._rollout else None
        if st is None or st.phase not in _ACTIVE:
            return 0
        by_arm: dict[Arm, list[Sample]] = {Arm.STABLE: [], Arm.CANARY: []}
        for s in batch:
            if s["arm"] is not None and s["epoch"] == st.stage_epoch:
                arm = Arm(s["arm"])
                by_arm[arm].append(Sample(arm=arm, ttft_s=s["ttft_s"], itl_s=s["itl_s"],
                                          e2e_s=s["e2e_s"], error=s["error"]))
        for arm, samples in by_arm.items():
            self._arms[arm].extend(samples)
        return sum(len(v) for v in by_arm.values())

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._canary_cfg.tick_interval_s)
            try:
                self._tick(time.time())
            except Exception:  # keep ticking; the audit log shows what happened before
                log.exception("rollout tick failed")

    def _tick(self, now: float) -> None:
        self._evaluate_qos(now)
        if self._rollout is None or self._rollout.state.phase not in _ACTIVE:
            return
        decisions = self._rollout.advance(now, self._arms[Arm.STABLE], self._arms[Arm.CANARY])
        if decisions:
            self._commit(decisions)

    def _evaluate_qos(self, now: float) -> None:
        """Judge the SLOs; publish changed directives; roll back a canary that alone fails
        an SLO mapped to rollback_canary."""
        st = self._rollout.state if self._rollout else None
        active = st is not None and st.phase in _ACTIVE
        report = self._qos.evaluate(canary=st.canary if active else None,
                                    stable=self._effective_stable())
        self._qos_report = report
        self._qos_metrics.update(report)
        if report.rollback_canary and active and st.phase is Phase.PROGRESSING:
            self._commit([self._rollout.rollback(now, reason=f"QoS: {report.rollback_canary}")])
        elif report.changed:
            self._publish()

    def _commit(self, decisions) -> None:
        """Persist the state and the decisions, start fresh samples if the stage changed."""
        st = self._rollout.state
        self._store.save(st)
        self._audit.extend(decisions)
        if st.stage_epoch != self._epoch:
            self._arms = self._fresh_samples()
            self._epoch = st.stage_epoch
        self._publish()

    # -- operator commands ----------------------------------------------------------------------------
    async def status(self) -> dict:
        return self._status()

    def _status(self) -> dict:
        st = self._rollout.state if self._rollout else None
        return {"rollout": st.to_dict() if st else None,
                "routing": self._table(),
                "samples": {"stable": len(self._arms[Arm.STABLE]),
                            "canary": len(self._arms[Arm.CANARY])},
                "variants": sorted(self._variants),
                "config_stable": self._config_stable}

    async def qos(self) -> dict:
        """The QoS monitor's last report and its configuration (admin API)."""
        return {"report": self._qos_report.to_dict() if self._qos_report else None,
                "config": self._qos.config.model_dump(mode="json")}

    async def history(self, limit: int = 50) -> list[dict]:
        return [d.to_dict() for d in self._audit.last(limit)]

    async def start(self, variant: str, plan: dict | None = None) -> dict:
        if variant not in self._variants:
            raise bad_request(f"variant: {variant!r} is not declared in cluster.yaml; "
                              f"declared: {sorted(self._variants)}", "variant")
        stable = self._effective_stable()
        if variant == stable:
            raise bad_request(f"variant: {variant!r} is already the stable variant", "variant")
        if self._rollout is not None and self._rollout.state.phase in _ACTIVE:
            raise _conflict("a rollout is already in progress; promote or roll it back first")
        try:
            rollout_plan = RolloutPlan.model_validate(plan or self._canary_cfg.plan)
        except Exception as exc:
            raise bad_request(f"plan: {exc}", "plan") from None
        self._rollout = Rollout.start(uuid.uuid4().hex[:12], stable, variant, rollout_plan,
                                      time.time())
        self._epoch = None
        self._commit(list(self._rollout.history))
        return self._status()

    def _command(self, action: str, **kwargs) -> dict:
        if self._rollout is None:
            raise _conflict("no rollout has been started")
        try:
            decision = getattr(self._rollout, action)(time.time(), **kwargs)
        except ValueError as exc:  # the state machine refuses this transition now
            raise _conflict(str(exc)) from None
        self._commit([decision])
        return self._status()

    async def pause(self, reason: str = "operator") -> dict:
        return self._command("pause", reason=reason)

    async def resume(self) -> dict:
        return self._command("resume")

    async def promote(self, full: bool = False) -> dict:
        return self._command("promote", full=full)

    async def rollback(self, reason: str = "operator") -> dict:
        return self._command("rollback", reason=reason)

    # -- feature flags --------------------------------------------------------------------------------
    async def flags(self) -> dict:
        return self._flags.to_dict()

    async def set_flag(self, flag: dict[str, Any]) -> dict:
        try:
            self._flags.set(Flag.model_validate(flag))
        except ValueError as exc:
            raise bad_request(f"flag: {exc}", "flag") from None
        return self._save_flags()

    async def delete_flag(self, name: str) -> dict:
        if not self._flags.remove(name):
            raise HTTPError(404, f"no flag named {name!r}", type="not_found_error", param="name",
                            code="flag_not_found")
        return self._save_flags()

    def _save_flags(self) -> dict:
        atomic_write_text(self._flags_path, self._flags.to_json())
        self._publish()
        return self._flags.to_dict()
