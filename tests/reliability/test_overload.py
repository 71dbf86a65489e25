"""Overload: four times the capacity for a bounded time; 429s, no crash, normal service after.

Capacity here is what the two stable replicas decode at once (2 x max_batch_size 4 in the
test config). For the test the deployment admits far more than that (max_ongoing_requests
raised in place, without restarting replicas), so it is the engines' admission control that
answers: up to 8 queued requests per engine, then 429 with Retry-After. 32 clients each send
2 streaming requests, waiting Retry-After after a refusal. Latency under overload (p99 TTFT
of admitted requests against an unloaded baseline) is the chaos bench's figure, not
asserted here.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import numpy as np
import pytest
from reliability.chaos_support import (DEPLOYMENT, completion,
                                       engine_gauges, qos_normal, stream_once, wait_idle)
from support import wait_until

CAPACITY = 2 * 4          # sequences the two engines decode at once
OFFERED = 4 * CAPACITY    # concurrent clients
ATTEMPTS = 2              # requests per client
TOKENS = 200              # per admitted request: the batch stays busy while clients pile up
ADMITTED = 64             # max_ongoing_requests for the test: beyond every engine bound


async def _clients(app, clients: int, attempts: int, tag: str, *, until_served=False):
    """``clients`` clients sending ``attempts`` streaming requests each; a refused one
    waits its Retry-After before the next attempt. ``until_served``: a client stops at
    its first request served. Returns each client's outcomes."""
    async with httpx.AsyncClient(timeout=None) as http:
        async def client(c: int):
            outcomes = []
            for a in range(attempts):
                outcome = await stream_once(http, app, completion(f"{tag} {c}.{a}", TOKENS))
                outcomes.append(outcome)
                if outcome.kind == "refused" and outcome.retry_after:
                    await asyncio.sleep(float(outcome.retry_after))
                elif until_served:
                    break
            return outcomes

        return await asyncio.gather(*(client(c) for c in range(clients)))


def _rejected(app) -> float | None:
    """Refusals counted by both engines so far (None while one has not reported lately)."""
    gauges = engine_gauges(app)
    return sum(g["rejected"] for g in gauges.values()) if len(gauges) == 2 else None


@pytest.mark.slow
def test_four_times_capacity_is_refused_with_429s_then_served_normally(serve_app,
                                                                      record_property):
    before = wait_idle(serve_app)
    rejected_before = sum(g["rejected"] for g in before.values())
    serve_app.deploy([{"name": DEPLOYMENT, "max_ongoing_requests": ADMITTED}])
    try:
        outcomes = [o for per_client in asyncio.run(
            _clients(serve_app, OFFERED, ATTEMPTS, "overload")) for o in per_client]
    finally:
        serve_app.deploy()
    kinds = Counter(o.kind for o in outcomes)
    admitted = [o for o in outcomes if o.kind == "completed"]
    refused = [o for o in outcomes if o.kind == "refused"]
    ttft_ms = np.array([o.ttft_s for o in admitted]) * 1e3
    record_property("outcomes", dict(kinds))
    record_property("admitted_ttft_ms_p50_p99",
                    [round(float(np.percentile(ttft_ms, q)), 1) for q in (50, 99)])
    record_property("refusals_by_status", dict(Counter(o.status for o in refused)))
    record_property("retry_after_s", dict(Counter(o.retry_after for o in refused)))

    # Each request was either served in full or refused up front: no error event, nothing
    # cut off or hanging.
    assert set(kinds) <= {"completed", "refused"}, [o for o in outcomes
                                                    if o.kind not in ("completed", "refused")]
    assert admitted and all(o.completion_tokens == TOKENS for o in admitted)
    # The refusals are the engines' admission control (429, a reason, Retry-After). Serve's
    # own queue can answer too (503 overloaded): each Router holds at most 4 requests while
    # it waits for a replica to take them, and starved replicas take them slowly.
    engine_refusals = [o for o in refused if o.status == 429]
    assert engine_refusals, kinds
    for o in refused:
        assert int(o.retry_after) >= 1, o
        assert (o.status, o.error["type"], o.error["code"]) in {
            (429, "rate_limit_error", "queue_full"), (429, "rate_limit_error", "load_shed"),
            (503, "overloaded_error", "overloaded")}, o
    # The engines counted exactly the refusals the clients saw from them.
    counted = []
    wait_until(lambda: counted.append(_rejected(serve_app)) or (
        counted[-1] is not None and counted[-1] - rejected_before >= len(engine_refusals)),
        timeout=60, interval=0.5)
    assert counted[-1] - rejected_before == len(engine_refusals)

    # No replica crashed or restarted, every engine is healthy and empty again...
    after = wait_idle(serve_app)
    assert set(after) == set(before)
    assert all(g["healthy"] == 1 and g["running"] == g["waiting"] == 0 for g in after.values())
    # ...and once the QoS monitor has lifted what the overload may have made it do (lower
    # the queue bounds, shed batch-class work: it holds them for recover_after_s), a load
    # within capacity is served in full. (A client may still meet an explicit refusal from
    # Serve's queue, as above; it retries after Retry-After, as clients should.)
    wait_until(lambda: qos_normal(serve_app), timeout=180, interval=1.0)
    normal = asyncio.run(_clients(serve_app, CAPACITY, 3, "after overload", until_served=True))
    record_property("refused_after_overload", sum(len(o) - 1 for o in normal))
    for client_outcomes in normal:
        *retried, last = client_outcomes
        assert last.kind == "completed" and last.completion_tokens == TOKENS, client_outcomes
        assert all(o.kind == "refused" and o.retry_after for o in retried), client_outcomes
