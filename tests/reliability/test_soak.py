"""Soak: a bounded run of mixed traffic; every request accounted for, nothing left behind.

Six clients (under the two engines' 8 decode slots) send 360 requests of a rotating mix
(about a minute on a 2-core machine): completions and chat streams, a client that hangs
up, a batch-class request, a request whose deadline passes mid-stream and one with two
choices. Every request must end the way
its kind should (or be refused explicitly, with Retry-After); afterwards the engines are
empty, MLX active memory net of the prefix cache is back to its baseline, and no replica
restarted. The replicas' RSS is sampled all along and reported, not asserted: the growth
figures come from ``python -m mlx_serving.bench.chaos soak``.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest
from reliability.chaos_support import (IDLE_GAUGES, completion, memory_net_of_prefix_cache,
                                       replica_pids, stream_once, wait_idle)

from mlx_serving.bench.chaos import rss_bytes

CLIENTS = 6
REQUESTS = 360
RSS_EVERY_S = 2.0
# test_disconnect's 1 MiB, plus what the prefix cache holds beyond the prefix_cache_bytes
# it reports: about 2 KiB per finished request on the tiny model (docs/RELIABILITY.md).
MEMORY_SLACK_BYTES = 2 << 20

# The mix: name -> (body fields, extra headers, hang up after, the kinds it may end as).
MIX = {
    "completion": (lambda i: completion(f"soak {i}", 32), {}, None, {"completed"}),
    "chat": (lambda i: {"model": "demo", "max_tokens": 48, "ignore_eos": True,
                        "messages": [{"role": "user", "content": f"soak chat {i}"}]},
             {}, None, {"completed"}),
    "hang_up": (lambda i: completion(f"soak drop {i}", 10_000), {}, 2, {"dropped"}),
    "batch_class": (lambda i: completion(f"soak batch {i}", 16), {"X-Priority": "batch"}, None,
                    {"completed"}),
    "deadline": (lambda i: completion(f"soak deadline {i}", 5_000),
                 {"X-Request-Timeout": "0.5"}, None, {"error_event"}),
    "two_choices": (lambda i: completion(f"soak n {i}", 16, n=2), {}, None, {"completed"}),
}


async def _soak(app, clients: int, requests: int, pids: dict[str, int]):
    """``requests`` requests of the mix from ``clients`` clients, with the RSS of every
    replica sampled meanwhile; returns (mix name, outcome) pairs and the samples."""
    names = list(MIX)
    pending = iter(range(requests))
    samples: list[dict[str, int]] = []
    done = asyncio.Event()

    async def sample_rss():
        while not done.is_set():
            samples.append({r: rss_bytes(pid) for r, pid in pids.items()})
            await asyncio.sleep(RSS_EVERY_S)

    async with httpx.AsyncClient(timeout=None) as http:
        async def client():
            results = []
            for i in pending:
                name = names[i % len(names)]
                body, headers, drop_after, _ = MIX[name]
                results.append((name, await stream_once(http, app, body(i), headers=headers,
                                                        drop_after=drop_after)))
            return results

        sampler = asyncio.create_task(sample_rss())
        per_client = await asyncio.gather(*(client() for _ in range(clients)))
        done.set()
        await sampler
    samples.append({r: rss_bytes(pid) for r, pid in pids.items()})
    return [r for results in per_client for r in results], samples


async def _one_of_each(app):
    async with httpx.AsyncClient(timeout=None) as http:
        await asyncio.gather(*(stream_once(http, app, body(-1), headers=headers,
                                           drop_after=drop_after)
                               for body, headers, drop_after, _ in MIX.values()))


@pytest.mark.slow
def test_mixed_traffic_accounts_for_every_request_and_leaves_nothing(serve_app,
                                                                     record_property):
    asyncio.run(_one_of_each(serve_app))  # warm-up, before the memory baseline
    before = wait_idle(serve_app)
    baseline = memory_net_of_prefix_cache(before)
    pids = replica_pids(serve_app)

    results, samples = asyncio.run(_soak(serve_app, CLIENTS, REQUESTS, pids))
    by_kind = Counter((name, o.kind) for name, o in results)
    record_property("outcomes", {f"{n}:{k}": c for (n, k), c in sorted(by_kind.items())})
    record_property("rss_mib_start_max_end", {
        r: [round(samples[0][r] / 2**20, 1), round(max(s[r] for s in samples) / 2**20, 1),
            round(samples[-1][r] / 2**20, 1)] for r in pids})

    # Every request ended as its kind should, or was refused explicitly (429/503 with
    # Retry-After): none hung, none was cut off without a reason.
    for name, outcome in results:
        expected = MIX[name][3]
        refused = (outcome.kind == "refused" and outcome.status in (429, 503)
                   and int(outcome.retry_after or 0) >= 1)
        assert outcome.kind in expected or refused, (name, outcome)
        if outcome.kind == "error_event":
            assert outcome.error["code"] == "deadline_exceeded", (name, outcome)
    served = Counter(name for name, o in results if o.kind in MIX[name][3])
    assert set(served) == set(MIX), by_kind  # every kind of request was served meanwhile

    # Nothing is left behind, and the same replicas still serve.
    after = wait_idle(serve_app)
    assert set(after) == set(before) == set(pids)
    for replica, gauges in after.items():
        assert {k: gauges[k] for k in IDLE_GAUGES} == dict.fromkeys(IDLE_GAUGES, 0), replica
    net = memory_net_of_prefix_cache(after)
    record_property("active_memory_net_of_prefix_cache", {"before": baseline, "after": net})
    record_property("prefix_cache_bytes", {r: (before[r]["prefix_cache"], g["prefix_cache"])
                                           for r, g in after.items()})
    for replica in net:
        assert net[replica] <= baseline[replica] + MEMORY_SLACK_BYTES, (replica, baseline, net)
