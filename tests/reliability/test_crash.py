"""Replica crash: an LLMServer replica killed while it streams and holds queued requests.

Each of the two stable replicas decodes 4 sequences at once and queues up to 4 more (the
test config). Sixteen clients stream requests back to back, so both batches stay full and
requests wait in both engines. Once the gauges show that, the replica holding the most
queued requests is killed, and the clients go on until each has been served twice more.
The victim's decoding streams end with an error event; its queued requests, which had
produced nothing yet, are sent again by the Router (``mlx_serving:request_retries``);
nothing hangs and nothing ends without a reason; Serve replaces the replica and the
service answers 2xx again. Timings are the chaos bench's (``bench/chaos.py crash``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest
import ray
from reliability.chaos_support import (completion, engine_gauges, live_replicas, stream_once,
                                       wait_idle)
from support import wait_until

CLIENTS = 16        # twice the 8 decode slots: requests queue in both engines
TOKENS = 64
BATCH = 4           # the test config's engine max_batch_size
SERVED_AFTER = 2    # requests each client must complete after the kill before it stops


async def _full_and_queueing(app, timeout: float = 120.0) -> dict[str, dict[str, float]]:
    """The gauges once both batches are full and requests wait in both engines."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = await asyncio.to_thread(engine_gauges, app)  # the clients stream meanwhile
        if len(gauges) == 2 and all(g["running"] == BATCH and g["waiting"] >= 1
                                    for g in gauges.values()):
            return gauges
        assert time.monotonic() < deadline, f"the load never filled both engines: {gauges}"
        await asyncio.sleep(0.1)


async def _load_with_a_kill(app):
    """The clients' load, the kill, and each client's (started after the kill, outcome)."""
    killed = asyncio.Event()
    served_after = [0] * CLIENTS
    done = asyncio.Event()

    async with httpx.AsyncClient(timeout=None) as http:
        async def client(c: int):
            results = []
            while not done.is_set():
                after_kill = killed.is_set()
                outcome = await stream_once(http, app,
                                            completion(f"crash {c}.{len(results)}", TOKENS))
                results.append((after_kill, outcome))
                if after_kill and outcome.kind == "completed":
                    served_after[c] += 1
                    if min(served_after) >= SERVED_AFTER:
                        done.set()
                if outcome.kind == "refused" and outcome.retry_after:
                    await asyncio.sleep(float(outcome.retry_after))
            return results

        clients = [asyncio.create_task(client(c)) for c in range(CLIENTS)]
        gauges = await _full_and_queueing(app)
        victim = max(gauges, key=lambda r: gauges[r]["waiting"])
        await asyncio.to_thread(lambda: ray.kill(
            ray.get_actor(app.replica_actors()[victim], namespace="serve"), no_restart=True))
        killed.set()
        try:
            per_client = await asyncio.wait_for(asyncio.gather(*clients), 300)
        finally:
            done.set()
    return victim, [r for results in per_client for r in results]


@pytest.mark.slow
def test_a_replica_killed_under_streaming_load_loses_no_request(serve_app, record_property):
    wait_idle(serve_app)
    retries_before = serve_app.metric("mlx_serving:request_retries_total")

    victim, results = asyncio.run(_load_with_a_kill(serve_app))
    outcomes = [o for _, o in results]
    kinds = Counter(o.kind for o in outcomes)
    record_property("outcomes", dict(kinds))

    # Every request ended in a way its client can see: nothing hangs or is cut off without
    # a reason. A request that found no room is refused with 503 and Retry-After.
    assert set(kinds) <= {"completed", "error_event", "refused"}, [
        o for o in outcomes if o.kind not in ("completed", "error_event", "refused")]
    assert all(o.status == 503 and int(o.retry_after) >= 1
               for o in outcomes if o.kind == "refused"), outcomes
    assert all(o.completion_tokens == TOKENS for o in outcomes if o.kind == "completed")
    # The victim's decoding streams (at most its batch) end with one error event each and
    # no [DONE]; only they do.
    errors = [o.error for o in outcomes if o.kind == "error_event"]
    assert 1 <= len(errors) <= BATCH, kinds
    assert all(e["type"] == "service_unavailable_error" for e in errors), errors
    # Its queued requests had produced nothing: the Router sent them again.
    wait_until(lambda: serve_app.metric("mlx_serving:request_retries_total") > retries_before,
               timeout=15, interval=0.5)
    # The surviving replica served every client meanwhile (the load stopped only then).
    assert sum(after and o.kind == "completed" for after, o in results) >= CLIENTS * SERVED_AFTER

    # Serve replaces the replica on its own; the service answers 2xx again.
    wait_until(lambda: len(live_replicas(serve_app)) == 2
               and victim not in live_replicas(serve_app), timeout=120, interval=0.5)
    serve_app.wait_ready()
    statuses = [httpx.post(f"{serve_app.url}/v1/completions", headers=serve_app.headers(),
                           timeout=60, json=completion(f"after crash {i}", 4)).status_code
                for i in range(6)]
    assert statuses == [200] * 6
    gauges = wait_idle(serve_app)
    assert len(gauges) == 2 and victim not in gauges
    assert all(g["running"] == g["waiting"] == g["kv_reserved"] == 0 for g in gauges.values())
