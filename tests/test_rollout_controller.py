"""The RolloutController deployment: its threading contract, and the QoS monitor it hosts."""

from __future__ import annotations

import asyncio
import inspect
import time

from mlx_serving.deployments.rollout_controller import RolloutController


def test_every_method_callers_reach_runs_on_the_event_loop():
    """Regression: Serve runs a deployment's sync methods in a thread pool. The operator
    commands (start, promote, rollback, flags, ...) were sync, so they changed the rollout
    and set the long-polls' asyncio Event from worker threads while the ticker changed the
    same state on the event loop."""
    cls = RolloutController.func_or_class
    public = [name for name, fn in inspect.getmembers(cls, inspect.isfunction)
              if not name.startswith("_")]
    assert {"start", "promote", "rollback", "pause", "resume", "status", "set_flag",
            "wait_for_change", "record"} <= set(public)
    assert [n for n in public if not inspect.iscoroutinefunction(getattr(cls, n))] == []


# -- QoS: samples of every request feed the monitor; its directives ride the routing table ---
def _controller(tmp_path, **qos):
    config = {"stable": "stable",
              "variants": {name: {"engine": {"models": [{"name": "demo", "path": "unused"}]}}
                           for name in ("stable", "canary")},
              "canary": {"state_dir": str(tmp_path)},
              "qos": {"slo": {"window_s": 60, "min_samples": 20}, **qos}}
    return RolloutController.func_or_class(config)


def _samples(variant, n, ttft_s=0.05, error=False, arm=None):
    return [{"variant": variant, "arm": arm, "epoch": 0, "ttft_s": ttft_s, "itl_s": 0.01,
             "e2e_s": 1.0, "error": error} for _ in range(n)]


def test_a_slo_violation_outside_any_rollout_publishes_a_directive(tmp_path):
    async def scenario():
        controller = _controller(tmp_path)
        before = await controller.routing()
        await controller.record(_samples("stable", 30, ttft_s=9.0))  # p95 TTFT 9 s > 5 s
        controller._tick(time.time())
        after = await controller.routing()
        report = (await controller.qos())["report"]
        controller._ticker.cancel()
        return before, after, report

    before, after, report = asyncio.run(scenario())
    assert before["qos"] == {}
    assert after["version"] > before["version"]
    assert after["qos"]["stable"] == {"shed_batch": True, "admission_scale": 0.5}
    assert report["variants"]["stable"]["violated"] == ["ttft_p95"]
    assert [a["slo"] for a in report["alerts"]] == ["ttft_p95"]


def test_a_canary_that_alone_breaks_the_error_slo_is_rolled_back(tmp_path):
    async def scenario():
        controller = _controller(tmp_path)
        await controller.start("canary")
        await controller.record(_samples("stable", 30, arm="stable")
                                + _samples("canary", 30, error=True, arm="canary"))
        controller._tick(time.time())
        status = await controller.status()
        history = await controller.history()
        controller._ticker.cancel()
        return status, history

    status, history = asyncio.run(scenario())
    assert status["rollout"]["phase"] == "rolled_back"
    assert status["routing"]["canary"] is None
    assert "QoS: canary canary violates error_rate" in history[-1]["reason"]
