"""A canary rollout across GPUs, with the rollback drill.

The stable variant runs on some GPUs and the canary on others (one LLMServer replica per
GPU, through Ray's GPU resources). The canary is the same model with a latency regression
injected before the first token (``settings.fault.delay_ms``, the drills' fault), standing
in for a slower model version. Under streaming load the rollout sends it a share of the
traffic, the A/B analysis finds the regression, and the rollout is rolled back::

    python -m mlx_serving.bench.canary_gpus --model /tmp/m/llama-8b-bfloat16 \\
        --stable-replicas 1 --canary-replicas 1 --delay-ms 150 --concurrency 32 --json out.json

Printed and written: each replica's GPU, the rollout's decisions with their times and
reasons, and per variant the requests served, their TTFT and any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from typing import Callable

import httpx

from mlx_serving.bench.chaos import APP, MODEL, chaos_config, percentiles_ms, running_app
from mlx_serving.bench.engine import machine
from mlx_serving.bench.servers import free_port
from mlx_serving.deployments.app import server_deployment_name
from mlx_serving.deployments.canary_cli import AdminClient
from mlx_serving.deployments.serve_env import ensure_applied

OPERATOR_TOKEN = "canary-drill-" + uuid.uuid4().hex[:8]


def drill_config(model: str, *, stable_replicas: int, canary_replicas: int, gpus: float,
                 delay_ms: float, max_batch_size: int, state_dir: str) -> dict:
    """cluster.yaml with a stable and a canary variant of ``model``, each replica on its own
    GPU(s), the canary ``delay_ms`` slower to its first token; QoS off (the rollback must be
    the rollout's own decision)."""
    config = chaos_config(model, replicas=stable_replicas, max_batch_size=max_batch_size,
                          max_ongoing=4 * max_batch_size, max_queued=4 * max_batch_size)
    args = config["applications"][0]["args"]
    stable = args["variants"]["stable"]
    stable["deployment"].setdefault("ray_actor_options", {})["num_gpus"] = gpus
    canary = copy.deepcopy(stable)
    canary["deployment"]["num_replicas"] = canary_replicas
    canary["settings"] = {"fault": {"delay_ms": delay_ms, "delay_percent": 100}}
    args["variants"]["canary"] = canary
    args["operator_token"] = OPERATOR_TOKEN
    args["canary"] = {"state_dir": state_dir, "tick_interval_s": 0.5}
    args["qos"] = {"enabled": False}
    return config


def replica_devices(expected: dict[str, int], timeout_s: float = 120.0
                    ) -> dict[str, list[dict]]:
    """Variant -> each live replica's process and GPU ids (Ray's, which it puts in the
    replica's CUDA_VISIBLE_DEVICES), for ``expected`` replicas of each variant."""
    from ray import serve

    out = {}
    for variant, count in expected.items():
        handle = serve.get_deployment_handle(server_deployment_name(variant), app_name=APP)
        out[variant] = heard_from(
            lambda calls: [r.result(timeout_s=60) for r in
                           [handle.info.remote() for _ in range(calls)]],
            count, timeout_s)
    return out


def heard_from(ask: Callable[[int], list[dict]], count: int, timeout_s: float) -> list[dict]:
    """The replicas (their ``replica``, ``pid`` and ``gpu_ids``) that answered ``ask(calls)``
    in rounds of concurrent calls, until ``count`` different ones did or ``timeout_s``
    passed. A call lands on whichever replica the router picks: on run 23's 4-GPU host,
    16 calls in a row all landed on one of a variant's two replicas."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, dict] = {}
    while len(seen) < count and time.monotonic() < deadline:
        for info in ask(2 * count):
            seen[info["replica"]] = {k: info[k] for k in ("replica", "pid", "gpu_ids")}
        if len(seen) < count:
            time.sleep(0.2)
    if len(seen) < count:
        print(f"heard from {len(seen)} of {count} replicas in {timeout_s:.0f} s",
              file=sys.stderr)
    return sorted(seen.values(), key=lambda r: r["replica"])


async def drive(url: str, stop: asyncio.Event, concurrency: int, max_tokens: int) -> list[dict]:
    """Streaming completions from ``concurrency`` clients until ``stop`` is set."""
    results: list[dict] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            rec = {"variant": None, "status": None, "ttft_s": None, "tokens": 0}
            try:
                async with http.stream("POST", f"{url}/v1/completions", json={
                        "model": MODEL, "prompt": "a canary across GPUs", "stream": True,
                        "max_tokens": max_tokens, "ignore_eos": True,
                        "stream_options": {"include_usage": True},
                        "user": uuid.uuid4().hex}) as r:
                    rec["status"], rec["variant"] = r.status_code, r.headers.get(
                        "x-mlx-serving-variant")
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            rec["status"] = "error_event"
                        elif event.get("usage"):
                            rec["tokens"] = event["usage"]["completion_tokens"]
                        if rec["ttft_s"] is None and any(c.get("text") for c in
                                                         event.get("choices") or []):
                            rec["ttft_s"] = time.perf_counter() - started
            except httpx.HTTPError as exc:
                rec["status"] = type(exc).__name__
            results.append(rec)

    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return results


async def rollout_drill(url: str, plan: dict, concurrency: int, max_tokens: int,
                        timeout_s: float) -> dict:
    """Start the rollout under load; wait for it to end (or ``timeout_s``); the record."""
    admin = AdminClient(url, OPERATOR_TOKEN, timeout=60).call
    stop = asyncio.Event()
    load = asyncio.create_task(drive(url, stop, concurrency, max_tokens))
    await asyncio.sleep(5)  # warm traffic on stable first
    started = time.monotonic()
    await asyncio.to_thread(admin, "POST", "/admin/canary/start",
                            {"variant": "canary", "plan": plan})
    phase = "progressing"
    while time.monotonic() - started < timeout_s:
        status = await asyncio.to_thread(admin, "GET", "/admin/canary/status")
        phase = status["rollout"]["phase"]
        if phase not in ("progressing", "paused"):
            break
        await asyncio.sleep(0.5)
    ended = time.monotonic() - started
    await asyncio.sleep(5)  # traffic after the decision: all on stable again
    stop.set()
    results = await load
    history = await asyncio.to_thread(admin, "GET", "/admin/canary/history?limit=50")
    rollout_id = status["rollout"]["rollout_id"]
    return {"phase": phase, "decided_after_s": round(ended, 1),
            "reason": status["rollout"].get("reason"),
            "last_analysis": status["rollout"].get("last_analysis"),
            "routing_after": status["routing"],
            "decisions": [{k: d.get(k) for k in ("action", "reason", "weight", "at")}
                          for d in history if d.get("rollout_id") == rollout_id],
            "by_variant": by_variant(results)}


def by_variant(results: list[dict]) -> dict:
    groups = defaultdict(list)
    for r in results:
        groups[r["variant"] or "none"].append(r)
    return {v: {"requests": len(rs), "outcomes": dict(Counter(str(r["status"]) for r in rs)),
                "ttft_ms": percentiles_ms([r["ttft_s"] for r in rs if r["ttft_s"] is not None],
                                          qs=(50, 90, 99)),
                "tokens": sum(r["tokens"] for r in rs)}
            for v, rs in sorted(groups.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--stable-replicas", type=int, default=1)
    p.add_argument("--canary-replicas", type=int, default=1)
    p.add_argument("--gpus-per-replica", type=float, default=1.0,
                   help="0 on a machine without GPUs (a functional run on CPUs)")
    p.add_argument("--delay-ms", type=float, default=150.0,
                   help="the canary's injected latency before the first token")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--weight", type=int, default=50, help="the canary's share in stage 1 (%%)")
    p.add_argument("--min-samples", type=int, default=200,
                   help="canary samples before stage 1's analysis")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--json", help="write the record here")
    args = p.parse_args(argv)

    config = drill_config(args.model, stable_replicas=args.stable_replicas,
                          canary_replicas=args.canary_replicas, gpus=args.gpus_per_replica,
                          delay_ms=args.delay_ms, max_batch_size=args.max_batch_size,
                          state_dir=tempfile.mkdtemp(prefix="canary-gpus-"))
    plan = {"stages": [{"weight": args.weight, "min_samples": args.min_samples,
                        "min_duration_s": 10, "max_extensions": 2},
                       {"weight": 100, "min_samples": 20, "min_duration_s": 5}]}
    with running_app(config, free_port()) as app:
        devices = replica_devices({"stable": args.stable_replicas,
                                   "canary": args.canary_replicas})
        drill = asyncio.run(rollout_drill(app.url, plan, args.concurrency, args.max_tokens,
                                          args.timeout_s))
    record = {"machine": machine(), "args": vars(args), "plan": plan, "replicas": devices,
              "drill": drill}
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0 if drill["phase"] == "rolled_back" else 1


if __name__ == "__main__":
    ensure_applied()   # this driver's handles talk to the replicas as the Routers do
    sys.exit(main())
