"""FreshQueueLengthRouter outside Serve: its settings and the view /admin/routing reports.
tests/e2e/test_replica_routing.py runs it in the Routers of a deployed application."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from mlx_serving.deployments import replica_routing
from mlx_serving.deployments.replica_routing import FreshQueueLengthRouter, routing_views


DEPLOYMENT = DeploymentID(name="LLMServer-unit", app_name="unit")


@dataclass(frozen=True)
class _Replica:
    """What the routing reads of a Serve replica (its actor calls are never made here)."""
    unique_id: str
    max_ongoing_requests: int = 512
    node_id: str = "node"
    availability_zone: str | None = None
    multiplexed_model_ids: list[str] = field(default_factory=list)

    @property
    def replica_id(self) -> ReplicaID:
        return ReplicaID(self.unique_id, DEPLOYMENT)


def _router(**kwargs) -> FreshQueueLengthRouter:
    router = FreshQueueLengthRouter(deployment_id=DEPLOYMENT,
                                    handle_source=DeploymentHandleSource.UNKNOWN,
                                    use_replica_queue_len_cache=True)
    router.initialize_state(**kwargs)
    return router


def test_a_router_reports_its_view_by_deployment():
    router = _router(refresh_interval_s=0.25)
    view = routing_views()["LLMServer-unit"]
    assert view == {"refresh_interval_s": 0.25, "choices": None, "refreshes": 0, "missed": 0,
                    "queue_lengths": {}}
    assert router.view() == view


def test_the_refresh_interval_must_be_positive():
    with pytest.raises(ValueError, match="refresh_interval_s"):
        _router(refresh_interval_s=0)


def test_choices_must_compare_at_least_two():
    with pytest.raises(ValueError, match="choices"):
        _router(choices=1)


def _picks(router: FreshQueueLengthRouter, queue_lengths: dict[str, int], n: int) -> Counter:
    """How often each replica is picked in ``n`` routings, with these cached queue lengths
    (Serve's own selection over the candidates ``choose_replicas`` gives)."""
    replicas = [_Replica(name) for name in queue_lengths]

    async def pick_all() -> Counter:
        router.update_replicas(replicas)  # its refresher stops at once: no Ray here
        picks = Counter()
        for _ in range(n):
            for replica in replicas:
                router.on_new_queue_len_info(replica.replica_id, queue_lengths[replica.unique_id])
            candidates = await router.choose_replicas(replicas)
            chosen = await router._select_from_candidate_replicas(candidates[0], 0)
            picks[chosen.unique_id] += 1
        return picks
    return asyncio.run(pick_all())


def test_a_request_goes_to_the_shortest_queue_of_all():
    lengths = {"a": 128, "b": 129, "c": 127, "d": 130}
    assert _picks(_router(), lengths, 200) == Counter({"c": 200})
    # Serve's two random choices send half of them past the one free slot, to a full batch
    two = _picks(_router(choices=2), lengths, 200)
    assert 60 < two["c"] < 140 and sum(two.values()) == 200, two


def test_ties_go_to_a_random_replica():
    picks = _picks(_router(), {"a": 3, "b": 3, "c": 3, "d": 3}, 400)
    assert set(picks) == {"a", "b", "c", "d"} and min(picks.values()) > 50, picks


@dataclass(frozen=True)
class _AskedReplica(_Replica):
    """A replica whose queue length comes back at once (``answer``) or never (None); a call
    cancelled is counted, as Serve's ``ray.cancel`` of it would be made."""
    answer: int | None = None
    cancels: list[int] = field(default_factory=list)

    async def get_queue_len(self, *, deadline_s: float) -> int:
        if self.answer is not None:
            return self.answer
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancels.append(1)
            raise
        raise AssertionError("unreachable")


@pytest.mark.parametrize("ray_goes_down", [False, True])
def test_a_late_answer_is_cancelled_only_while_ray_is_up(monkeypatch, ray_goes_down):
    # Serve cancels a late get_queue_len with ray.cancel, which starts Ray again (auto-init)
    # in a driver whose Ray was shut down while the round waited: the e2e test's child once
    # found the refresher had started a Ray of its own.
    ray_up = [False]  # no refresher: update_replicas starts none while Ray is down
    monkeypatch.setattr(replica_routing, "_ray_connection",
                        lambda: ("node", "job") if ray_up[0] else None)
    router = _router(refresh_interval_s=0.1)
    prompt, late = _AskedReplica("prompt", answer=3), _AskedReplica("late")

    async def one_round() -> int:
        router.update_replicas([prompt, late])
        # Serve probes new replicas itself (and cancels a late probe): let that end first
        await asyncio.sleep(2 * router.queue_len_response_deadline_s)
        late.cancels.clear()
        router._connection, ray_up[0] = ("node", "job"), True
        if ray_goes_down:
            asyncio.get_running_loop().call_later(0.05, ray_up.__setitem__, 0, False)
        await router.refresh()
        await asyncio.sleep(0.05)
        return len(late.cancels)  # before asyncio.run cancels what is left

    assert asyncio.run(one_round()) == (0 if ray_goes_down else 1)
    view = router.view()
    assert (view["refreshes"], view["missed"], view["queue_lengths"]["prompt"]) == (1, 1, 3)
