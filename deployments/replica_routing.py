"""How each Router picks an LLMServer replica: the shortest of fresh queue lengths.

Serve's request router (two random replicas, the one with the shorter queue) reads queue
lengths from a cache in each caller. A caller counts what it sends and what it sees finish,
and learns of other callers' requests only from a replica's answer when it sends there; an
entry lives 10 s. With several Routers, a replica that a Router has not picked lately keeps
the count it had then while its requests finish, so every Router passes it over: on 2 and 4
H200s one replica held 139 streams while another held 81 (docs/BENCHMARKS.md, run 17).
Trusting entries for less time makes the Routers ask the replicas before they route, and
requests then wait on the busiest replicas' answers (run 17 saw 503s).

``FreshQueueLengthRouter`` keeps Serve's routing and its cache, and asks every replica for its
queue length in the background, every ``refresh_interval_s``: a Router's view then lags the
truth by one interval at most, and routing never waits for an answer. On 2 and 4 H100s it
raised throughput by 27% and 17% and took the 503s from 84 and 115 to 0 and 5 (run 18).

With every replica's length at hand, a request goes to the shortest queue of all (ties to a
random one) rather than to the shorter of two random replicas: comparing two saves asking
every replica, which the refresher does anyway. It matters when the streams about fill the
replicas' batches: a request sent to the shorter of two waits for a slot while a replica
outside the pair has one free (``choices: 2`` restores the two choices). On 4 H100s it
evened the replicas' token shares (26/25/25/25% against 27/26/25/22%) and halved TTFT p99
(run 20).

Every LLMServer deployment uses it (0.1 s) unless its variant's ``deployment`` in cluster.yaml
names another::

    deployment:
      request_router_config:
        request_router_class: mlx_serving.deployments.replica_routing:FreshQueueLengthRouter
        request_router_kwargs: {refresh_interval_s: 0.25, choices: 2}

Each round costs one small call per replica from each Router (Routers x replicas calls per
interval); a deployment of one replica has nothing to choose between, so no rounds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref

from ray import runtime_context
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

log = logging.getLogger("ray.serve")

ROUTER_CLASS = "mlx_serving.deployments.replica_routing:FreshQueueLengthRouter"

# The routers of this process (one per calling handle and deployment), for routing_views().
_LIVE: weakref.WeakSet[FreshQueueLengthRouter] = weakref.WeakSet()


def _ray_connection() -> tuple[str, str] | None:
    """This process's Ray connection as (node, job), or None while Ray is down. A handle's
    router outlives ``ray.shutdown()`` in a driver, and Ray may be started again in that
    process (Serve's own long-poll client does, through auto-init, and may join another
    cluster), so ``ray.is_initialized()`` alone cannot tell the refresher its Ray is gone."""
    try:
        # ray.runtime_context's own function: ray.get_runtime_context would start Ray again
        context = runtime_context.get_runtime_context()
        return context.get_node_id(), context.get_job_id()
    except RuntimeError:  # Ray is not initialized (both getters check it)
        return None


def routing_views() -> dict[str, dict]:
    """What each ``FreshQueueLengthRouter`` of this process holds, by deployment name:
    every replica's cached queue length (None: none cached) and the refreshes done."""
    return {router.deployment_name: router.view() for router in list(_LIVE)}


class FreshQueueLengthRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's power-of-two-choices router, comparing every replica (or ``choices``
    random ones) on queue lengths refreshed in the background. Serve builds one per caller
    and deployment (in each Router replica)."""

    def initialize_state(self, refresh_interval_s: float = 0.1, choices: int | None = None,
                         **kwargs) -> None:
        """``refresh_interval_s``: seconds between two rounds of asking every replica;
        ``choices``: how many random replicas a request compares (None: all of them)."""
        super().initialize_state(**kwargs)
        if refresh_interval_s <= 0:
            raise ValueError(f"refresh_interval_s must be > 0, not {refresh_interval_s}")
        if choices is not None and choices < 2:
            raise ValueError(f"choices must be at least 2 (or None for all), not {choices}")
        self.refresh_interval_s = refresh_interval_s
        self.choices = choices
        self.refreshes = 0  # rounds done
        self.missed = 0  # answers that did not come within their round (kept the old entry)
        self._refresher: asyncio.Task | None = None
        self._connection: tuple[str, str] | None = None  # the Ray the refresher started in
        # Serve ships this class to its callers pickled, possibly by value, with a copy of
        # this module's globals: register with the module the caller's process imports.
        from mlx_serving.deployments import replica_routing
        replica_routing._LIVE.add(self)

    @property
    def deployment_name(self) -> str:
        return self._deployment_id.name

    def view(self) -> dict:
        """This router's cached queue length of every replica, its refreshes so far, and
        the answers that missed their round (a replica too busy to answer in time)."""
        cache = self._replica_queue_len_cache
        return {"refresh_interval_s": self.refresh_interval_s, "choices": self.choices,
                "refreshes": self.refreshes, "missed": self.missed,
                "queue_lengths": {rid.unique_id: cache.get(rid) for rid in self.curr_replicas}}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        """The replicas a request compares, in a random order (Serve takes the first of
        the shortest): ``choices`` of them, or all, among those Serve's multiplexing and
        locality preferences allow (Serve's own two choices take the same candidates)."""
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = list(self.apply_multiplex_routing(pending_request=pending_request))
        else:
            ids = list(self.apply_locality_routing(pending_request=pending_request))
        if not ids:
            return []
        chosen = random.sample(ids, min(self.choices or len(ids), len(ids)))
        return [[self._replicas[replica_id] for replica_id in chosen]]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)  # runs on the router's event loop
        if replicas and self._refresher is None:
            self._connection = _ray_connection()
            self._refresher = self._event_loop.create_task(self._refresh_forever())
        elif not replicas and self._refresher is not None:  # the deployment went away
            self._refresher.cancel()
            self._refresher = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            # A handle's router outlives ray.shutdown() in its process (a driver's), and
            # an actor call would start Ray again there (auto-init): stop instead, also
            # when something else has started Ray again meanwhile.
            if not self._connected():
                self._refresher = None
                return
            try:
                await self.refresh()
            except Exception:  # never let the refresher die: routing would go stale again
                log.exception("refreshing the replicas' queue lengths failed")

    def _connected(self) -> bool:
        """Whether Ray is still the connection the refresher started in."""
        return self._connection is not None and _ray_connection() == self._connection

    async def refresh(self) -> None:
        """Ask every replica for its queue length (concurrently) and cache the answers; a
        replica that does not answer within the interval keeps its entry. With one replica
        there is no choice to make, so no round."""
        replicas = list(self.curr_replicas.values())
        if len(replicas) < 2:
            return
        answers = await asyncio.gather(*map(self._ask, replicas), return_exceptions=True)
        current = self.curr_replicas
        for replica, answer in zip(replicas, answers):
            if not isinstance(answer, int):
                self.missed += 1
            elif replica.replica_id in current:
                self.on_new_queue_len_info(replica.replica_id, answer)
        self.refreshes += 1

    async def _ask(self, replica: RunningReplica) -> int | None:
        """The replica's queue length, or None if it did not answer within the interval.
        A late answer's call is cancelled only while Ray is still up: Serve cancels it with
        ``ray.cancel``, which would start Ray again (auto-init) in a driver whose Ray was
        shut down while the round waited."""
        call = asyncio.ensure_future(self._call(replica))
        try:
            done, _ = await asyncio.wait({call}, timeout=self.refresh_interval_s)
            return call.result() if done else None
        finally:
            if not call.done():
                if self._connected():
                    call.cancel()
                else:  # left to end with its Ray; its outcome is nobody's
                    call.add_done_callback(lambda c: c.cancelled() or c.exception())

    async def _call(self, replica: RunningReplica) -> int | None:
        # Checked in the same step as the actor call (get_queue_len makes it before its
        # first await): a ray.shutdown() in another thread has next to no moment between.
        if not self._connected():
            return None
        return await replica.get_queue_len(deadline_s=self.refresh_interval_s)
