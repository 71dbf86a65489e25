"""The RolloutController deployment's threading contract."""

from __future__ import annotations

import inspect

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
