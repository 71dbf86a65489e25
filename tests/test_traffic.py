"""The Router's routing-table watcher (deployments/traffic.py) against a controller whose
calls fail the ways a Serve handle's calls do."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from mlx_serving.deployments.traffic import TrafficSplit


def _table(version: int, canary: str | None = None, weight: float = 0.0) -> dict:
    return {"version": version, "rollout_id": "r1" if canary else None, "stable": "stable",
            "canary": canary, "weight": weight, "epoch": 1}


class Controller:
    """Speaks the RolloutController's long-poll API; ``answers`` are played in order: a
    table, or an exception to raise from the awaited call."""

    def __init__(self, answers: list):
        self.answers = list(answers)
        self.polls = 0
        self.wait_for_change = SimpleNamespace(remote=self._wait_for_change)
        self.record = SimpleNamespace(remote=self._record)

    async def _wait_for_change(self, version: int, timeout_s: float) -> dict:
        self.polls += 1
        if not self.answers:
            await asyncio.sleep(timeout_s)
            return _table(version)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def _record(self, batch: list) -> None:
        pass


def test_a_long_poll_cancelled_on_the_controller_side_does_not_end_the_watch():
    """Regression: a Serve handle call raises CancelledError when the callee cancels it
    (the controller replica shutting down mid-poll). The watcher used to re-raise it and
    die, so that Router routed by its old table from then on (canary traffic after a
    rollback)."""
    rollback = _table(3)

    async def scenario():
        controller = Controller([_table(2, "canary", 0.5), asyncio.CancelledError(), rollback])
        split = TrafficSplit(controller, "stable")
        assert split.table["version"] == -1  # first use starts the watch
        for _ in range(100):
            await asyncio.sleep(0.05)
            if split.table["version"] == 3:
                break
        split.stop()
        return split.table, controller.polls, split.watch_state()

    table, polls, state = asyncio.run(scenario())
    assert table == rollback and polls >= 3
    assert state["version"] == 3 and state["polls"] >= 2
    assert state["recent_failures"] == ["CancelledError()"]


def test_a_watch_that_ended_is_restarted_by_the_next_use_of_the_table():
    async def scenario():
        controller = Controller([])
        split = TrafficSplit(controller, "stable")
        split.table  # starts the watch and the sample flusher
        first = list(split._tasks)
        first[0].cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert first[0].done()
        split.table
        second = list(split._tasks)
        split.stop()
        await asyncio.sleep(0)
        return first, second

    first, second = asyncio.run(scenario())
    assert not any(t in first for t in second) and len(second) == 2


def test_the_watch_started_inside_a_request_does_not_carry_its_request_id():
    """Regression: the watch starts lazily on a request's first use of the table. Its tasks
    inherited that request's Serve context, so every long-poll to the controller was
    logged under the id of whichever request happened to start it."""
    from ray.serve.context import _get_serve_request_context, _set_request_context

    seen = []

    class Recording(Controller):
        async def _wait_for_change(self, version, timeout_s):
            seen.append(_get_serve_request_context().request_id)
            return await super()._wait_for_change(version, timeout_s)

    async def scenario():
        _set_request_context(request_id="client-request-1")
        split = TrafficSplit(Recording([_table(2)]), "stable")
        split.table  # first use, inside the request
        for _ in range(100):
            await asyncio.sleep(0.01)
            if seen:
                break
        split.stop()

    asyncio.run(scenario())
    assert seen and "client-request-1" not in seen
