"""Chaos runs: the figures behind tests/reliability, with the application under ``serve run``.

Each run starts its own local Ray and deploys cluster.yaml's application on loopback with
the given model (``serve run``, as ``bench.serve`` does), drives it with the load
generator's HTTP client (``bench.loadgen.HttpTarget``), does something bad to it, prints
what happened and stops by itself. The tests assert counts and states; these runs report
the times and memory figures that tests must not assert::

    python -m mlx_serving.bench.chaos crash      # kill an LLMServer replica under load
    python -m mlx_serving.bench.chaos disconnect # clients that hang up mid-stream
    python -m mlx_serving.bench.chaos overload   # 4x capacity, then normal load
    python -m mlx_serving.bench.chaos soak       # minutes of mixed traffic, RSS sampled

Memory is MLX active memory of the replica (``mx.get_active_memory()``, from the engine's
stats) net of what its prefix cache holds (``prefix_cache_bytes``), with the replica
process's RSS alongside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import numpy as np

from mlx_serving.bench.engine import machine
from mlx_serving.bench.loadgen import (HttpTarget, RequestError, RequestSpec, Usage, Workload,
                                      run_load)
from mlx_serving.bench.serve import stable_config
from mlx_serving.bench.servers import deploy, free_port, wait_ready, wait_until
from mlx_serving.deployments.app import server_deployment_name
from mlx_serving.deployments.serve_env import ensure_applied, serve_env

REPO = Path(__file__).resolve().parent.parent
APP = "mlx-serving"
MODEL = "bench"           # the name stable_config serves the model under
SERVER = server_deployment_name("stable")


# -- the application ---------------------------------------------------------------------------------
def chaos_config(model: str, *, replicas: int = 1, max_batch_size: int = 8,
                 max_ongoing: int = 64, max_queued: int = 64, engine: dict | None = None) -> dict:
    """cluster.yaml serving ``model`` from ``replicas`` stable replicas on this one machine
    (fixed count, no autoscaling, no one-per-node rule) with the given engine batch,
    Serve limits and engine settings (the prefix cache stays on unless ``engine`` says)."""
    config = stable_config(model, None, {}, {"prompt_cache_bytes": 512 * 2**20,
                                             "max_batch_size": max_batch_size, **(engine or {})})
    variant = config["applications"][0]["args"]["variants"]["stable"]
    deployment = variant["deployment"]
    for key in ("autoscaling_config", "max_replicas_per_node"):
        deployment.pop(key, None)
    deployment.update(num_replicas=replicas, max_ongoing_requests=max_ongoing,
                      max_queued_requests=max_queued)
    return config


@dataclass
class App:
    """The deployed application as the runs see it: its URL and its replicas' engines."""

    url: str

    def server(self):
        from ray import serve

        return serve.get_deployment_handle(SERVER, app_name=APP)

    async def stats(self) -> dict:
        """EngineStats of a replica (the only one, where there is one) as a dict."""
        return await self.server().stats.remote()

    def replicas(self) -> dict[str, str]:
        """Replica id -> Ray actor name, of the live LLMServer replicas."""
        import ray

        prefix = f"SERVE_REPLICA::{APP}#{SERVER}#"
        return {a["name"].removeprefix(prefix): a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(prefix)}

    def pid(self, actor_name: str) -> int:
        import ray

        actor = ray.get_actor(actor_name, namespace="serve")
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)

    def kill(self, replica: str) -> None:
        import ray

        ray.kill(ray.get_actor(self.replicas()[replica], namespace="serve"), no_restart=True)

    def metric(self, name: str) -> float:
        """A metric summed over the application (every label set)."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))


@contextmanager
def running_app(config: dict, port: int) -> Iterator[App]:
    """``config`` deployed by ``serve run`` onto a Ray started here (loopback only); yields
    once the application is ready, shuts everything down after.

    Ray is started in this process rather than by ``serve run`` so that the handles and
    actor calls of the run reach this cluster and no other Ray on the machine. It starts in
    ``make run``'s Serve mode (``serve_env``).
    """
    os.environ.update(serve_env())
    import ray
    from ray import serve

    config["http_options"].update(host="127.0.0.1", port=port)
    for attempt in range(3):  # a starved machine can miss Ray's 30 s node start-up limit
        try:
            ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR")
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        app = App(deploy(config, ray.get_runtime_context().gcs_address))
        if not wait_ready(app.url, 600):
            raise RuntimeError("the application did not become ready")
        yield app
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process on this machine (Linux /proc, else ps)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True,
                             text=True, check=True).stdout
        return int(out.strip()) * 1024


def net_memory(stats: dict) -> int:
    """MLX active memory not held by the prefix cache."""
    return stats["active_memory_bytes"] - stats["prefix_cache_bytes"]


# -- what each request did ---------------------------------------------------------------------------
@dataclass
class Record:
    """One request: perf_counter times, tokens, and how it ended (``error`` None: completed)."""

    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    error: str | None = None

    @property
    def outcome(self) -> str:
        """completed | dropped | error_event | refused | lost."""
        if self.error is None:
            return "completed"
        if self.error == "dropped":
            return "dropped"
        if self.error.startswith("sse_error_"):
            return "error_event"
        if self.error.startswith("http_"):
            return "refused"
        return "lost"  # cut off without an error event, a transport failure, no answer

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.start


_ERROR_CODE = re.compile(r'"code":\s*"(\w+)"')


class RecordingTarget:
    """A load-generator target that keeps a Record of every request it streams."""

    def __init__(self, inner: HttpTarget):
        self.inner = inner
        self.records: list[Record] = []

    async def stream(self, spec: RequestSpec) -> AsyncIterator[int | Usage]:
        record = Record(start=time.perf_counter())
        self.records.append(record)
        try:
            async for n in self.inner.stream(spec):
                if isinstance(n, Usage):
                    record.tokens = max(record.tokens, n.completion_tokens)
                else:
                    if record.first is None:
                        record.first = time.perf_counter()
                    record.tokens += n
                yield n
        except RequestError as exc:
            code = _ERROR_CODE.search(str(exc))  # an error answer's code, if it shows
            record.error = f"{exc.kind}:{code[1]}" if exc.kind.startswith("http_") and code \
                else exc.kind
            raise
        except (GeneratorExit, asyncio.CancelledError):
            record.error = "dropped"  # the consumer hung up
            raise
        except Exception as exc:
            record.error = type(exc).__name__
            raise
        finally:
            record.end = time.perf_counter()


def counts(records: list[Record]) -> dict[str, int]:
    """Requests by outcome."""
    return dict(Counter(r.outcome for r in records))


def error_kinds(records: list[Record]) -> dict[str, int]:
    """Failed requests by the load generator's error kind (http_503, sse_error_..., ...)."""
    return dict(Counter(r.error for r in records if r.error is not None))


def percentiles_ms(seconds: list[float], qs=(50, 99)) -> dict[str, float | None]:
    if not seconds:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(np.percentile(np.asarray(seconds) * 1e3, q)), 1) for q in qs}


async def drop_after(target: HttpTarget | RecordingTarget, spec: RequestSpec,
                     chunks: int) -> int:
    """Stream ``spec`` and hang up after ``chunks`` chunks; returns the chunks read (a
    failure ends it early: a RecordingTarget keeps how)."""
    stream = target.stream(spec)
    read = 0
    try:
        async for _ in stream:
            read += 1
            if read >= chunks:
                break
    except Exception:
        pass
    finally:
        await stream.aclose()  # closes the response: the connection goes away mid-stream
    return read


# -- crash -------------------------------------------------------------------------------------------
async def crash(app: App, args) -> dict:
    """Kill an LLMServer replica under a streaming load.

    ``concurrency`` clients stream ``requests`` requests in all; ``kill_after_s`` into the
    run one replica is killed. Counts every request's outcome (those in flight at the kill
    apart), the Router's retries, and times how long until Serve has replaced the replica;
    then runs a short load on the recovered service."""
    workload = Workload(requests=args.requests, prompt_tokens=args.prompt_tokens,
                        max_tokens=args.max_tokens, warmup=0, seed=1)
    retries_before = app.metric("mlx_serving:request_retries_total")
    before = set(app.replicas())
    times: dict[str, float] = {}

    def replaced(victim: str) -> bool:
        live = app.replicas()
        return len(live) == args.replicas and victim not in live and app.ready()

    async def kill_then_watch():  # Ray and HTTP calls in a thread: the clients run on
        await asyncio.sleep(args.kill_after_s)
        victim = sorted(await asyncio.to_thread(app.replicas))[0]
        times["kill"] = time.perf_counter()
        await asyncio.to_thread(app.kill, victim)
        while not await asyncio.to_thread(replaced, victim):
            await asyncio.sleep(0.25)
        times["replaced"] = time.perf_counter()

    async with HttpTarget(app.url, MODEL, max_connections=args.concurrency + 8) as http:
        target = RecordingTarget(http)
        watcher = asyncio.create_task(kill_then_watch())
        result = await run_load(target, workload, args.concurrency)
        if "kill" not in times:
            raise RuntimeError("the load ended before the kill: raise --requests")
        await asyncio.wait_for(watcher, 300)
        kill = times["kill"]
        after_load = RecordingTarget(http)
        after = await run_load(after_load, replace(workload, requests=4 * args.concurrency,
                                                   seed=2), args.concurrency)
    await asyncio.sleep(2.5)  # the Routers push their counters once a second
    records = target.records
    hit = [r for r in records if r.start < kill < r.end]
    ok_after = [r.end for r in records if r.outcome == "completed" and r.end > kill]
    failed = [r.end for r in records if r.outcome != "completed" and r.end >= kill]
    return {
        "requests": len(records), "outcomes": counts(records), "errors": error_kinds(records),
        "in_flight_at_kill": len(hit), "in_flight_at_kill_outcomes": counts(hit),
        "retried": app.metric("mlx_serving:request_retries_total") - retries_before,
        "replicas_before": len(before), "replica_replaced_s": round(times["replaced"] - kill, 2),
        "first_completion_after_kill_s": round(min(ok_after) - kill, 3) if ok_after else None,
        "last_failure_after_kill_s": round(max(failed) - kill, 3) if failed else None,
        "after_recovery": {"requests": after.requests_ok + after.requests_failed,
                           "outcomes": counts(after_load.records)},
        "load_output_tok_s": result.output_tok_s,
    }


# -- disconnect --------------------------------------------------------------------------------------
async def disconnect(app: App, args) -> dict:
    """Clients that hang up mid-stream: how fast their sequence leaves the batch.

    ``clients`` clients, one after another, each hang up after 1-5 chunks while ``keepers``
    long streams keep the batch stepping; for each, the decode steps and milliseconds from
    closing the connection until the engine reports the sequence gone (its stats polled
    back to back). Then the engine's state and memory against the baseline."""
    specs = Workload(requests=args.clients + args.keepers + 8, prompt_tokens=args.prompt_tokens,
                     max_tokens=100_000, warmup=0, seed=3).specs()[1]
    async with HttpTarget(app.url, MODEL, max_connections=args.keepers + 8) as http:
        for spec in specs[:8]:  # warm-up: the replica has run and dropped sequences
            await drop_after(http, spec, 2)
        await wait_until_async(lambda s: s["running"] == 0, app)
        base = await app.stats()
        pid = app.pid(next(iter(app.replicas().values())))
        rss_before = rss_bytes(pid)

        keepers = [asyncio.create_task(drop_after(http, spec, 10**9))
                   for spec in specs[8:8 + args.keepers]]
        await wait_until_async(lambda s: s["running"] == s["in_batch"] == args.keepers, app)
        steps, ms = [], []
        for i, spec in enumerate(specs[8 + args.keepers:]):
            stream = http.stream(spec)
            read = 0
            async for _ in stream:
                read += 1
                if read >= 1 + i % 5:
                    break
            before = await app.stats()   # this sequence is in the batch now
            t0 = time.perf_counter()
            await stream.aclose()        # the client hangs up
            while True:                  # until neither the engine nor mlx-lm holds it
                s = await app.stats()
                if s["running"] == s["in_batch"] == args.keepers:
                    break
                if time.perf_counter() - t0 > 60:
                    raise RuntimeError(f"a dropped sequence stayed in the batch: {s}")
            ms.append((time.perf_counter() - t0) * 1e3)
            steps.append(s["steps"] - before["steps"])
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        idle = await wait_until_async(lambda s: s["running"] == s["waiting"] == 0, app)
        step_ms = 1e3 * (idle["decode_s"] - base["decode_s"]) / max(idle["steps"] - base["steps"], 1)
    return {
        "clients": len(steps), "keepers": args.keepers,
        "steps_to_leave_batch": {"p50": float(np.percentile(steps, 50)),
                                 "p90": float(np.percentile(steps, 90)), "max": max(steps)},
        "ms_to_leave_batch": {"p50": round(float(np.percentile(ms, 50)), 1),
                              "p90": round(float(np.percentile(ms, 90)), 1),
                              "max": round(max(ms), 1)},
        "mean_decode_step_ms": round(step_ms, 2),
        "before": _memory(base, rss_before), "after": _memory(idle, rss_bytes(pid)),
    }


def _memory(stats: dict, rss: int) -> dict:
    return {"running": stats["running"], "waiting": stats["waiting"], "paused": stats["paused"],
            "kv_reserved_bytes": stats["kv_reserved_bytes"],
            "active_memory_bytes": stats["active_memory_bytes"],
            "prefix_cache_bytes": stats["prefix_cache_bytes"],
            "active_net_of_prefix_cache_bytes": net_memory(stats), "rss_bytes": rss}


async def wait_until_async(predicate, app: App, timeout: float = 120.0) -> dict:
    """Poll the engine's stats until ``predicate(stats)`` holds; returns those stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await app.stats()
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise RuntimeError(f"engine state not reached: {stats}")
        await asyncio.sleep(0.05)


# -- overload ----------------------------------------------------------------------------------------
async def retry_after_probe(app: App, stop: asyncio.Event, every_s: float = 0.25) -> list:
    """(status, Retry-After) of a 1-token request sent every ``every_s`` (without waiting
    for the previous answer) until ``stop``."""
    async with httpx.AsyncClient(timeout=600) as client:
        async def one():
            r = await client.post(f"{app.url}/v1/completions",
                                  json={"model": MODEL, "prompt": "probe", "max_tokens": 1})
            return r.status_code, r.headers.get("retry-after")

        tasks = []
        while not stop.is_set():
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(every_s)
        return list(await asyncio.gather(*tasks))


def qos_normal(app: App) -> bool:
    """The QoS monitor asks for neither lowered admission nor batch shedding (stable)."""
    text = httpx.get(f"{app.url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(("mlx_serving:qos_admission_scale{", "mlx_serving:qos_shed_batch{")) \
                and 'variant="stable"' in line:
            value = float(line.rsplit(" ", 1)[1])
            if value != (1.0 if "admission_scale" in line else 0.0):
                return False
    return True


async def overload(app: App, args) -> dict:
    """Offered load at a multiple of capacity, then normal load.

    Capacity is the request rate at ``max_batch_size`` concurrent clients (closed loop);
    then requests arrive open-loop at ``factor`` times that for ``duration_s``, whatever
    the answers, while a probe client notes Retry-After; then the closed-loop load again,
    at once and once the QoS monitor has lifted what the overload made it do. TTFT of
    admitted requests is set against an unloaded baseline (one client)."""
    w = Workload(requests=0, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                 warmup=0, seed=4)
    normal = replace(w, requests=4 * args.max_batch_size)
    async with HttpTarget(app.url, MODEL, max_connections=1024) as http:
        await run_load(http, replace(w, requests=2), 1)  # warm-up
        unloaded = RecordingTarget(http)
        await run_load(unloaded, replace(w, requests=args.baseline_requests, seed=8), 1)
        saturated = await run_load(http, replace(normal, seed=5), args.max_batch_size)
        capacity = saturated.requests_s
        rate = args.factor * capacity
        n = max(1, int(rate * args.duration_s))
        loaded = RecordingTarget(http)
        stop = asyncio.Event()
        probe = asyncio.create_task(retry_after_probe(app, stop))
        # Open loop: Poisson arrivals at ``rate``, whatever the answers (no in-flight cap).
        started = time.perf_counter()
        await run_load(loaded, replace(w, requests=n, seed=6), 10**6, rate=rate)
        overload_s = time.perf_counter() - started
        stop.set()
        probed = await probe
        ended = time.perf_counter()
        right_after = RecordingTarget(http)
        await run_load(right_after, replace(normal, seed=7), args.max_batch_size)
        scale_after = (await app.stats())["admission_scale"]
        await asyncio.to_thread(wait_until, lambda: qos_normal(app), 300)
        qos_lifted_s = time.perf_counter() - ended
        recovered = RecordingTarget(http)
        await run_load(recovered, replace(normal, seed=9), args.max_batch_size)
    admitted = [r for r in loaded.records if r.outcome == "completed"]
    statuses = Counter("200" if r.error is None else r.error.removeprefix("http_")
                       for r in loaded.records)
    retry_after = Counter(value for status, value in probed if status in (429, 503))
    return {
        "capacity_req_s": round(capacity, 2), "offered_req_s": round(rate, 2),
        "offered_requests": n, "overload_s": round(overload_s, 1), "by_status": dict(statuses),
        "admitted_ttft_ms": percentiles_ms([r.ttft_s for r in admitted]),
        "unloaded_ttft_ms": percentiles_ms([r.ttft_s for r in unloaded.records
                                            if r.outcome == "completed"]),
        "saturated_ttft_ms": {k: saturated.ttft_ms[k] for k in ("p50", "p99")},
        "retry_after_s_seen_by_probe": dict(retry_after),
        "probe_statuses": dict(Counter(str(status) for status, _ in probed)),
        "right_after": {**counts(right_after.records), "errors": error_kinds(right_after.records),
                        "engine_admission_scale": scale_after},
        "qos_lifted_after_s": round(qos_lifted_s, 1),
        "after_qos_lifted": counts(recovered.records),
        "replicas": len(app.replicas()),
        "engine": {k: v for k, v in (await app.stats()).items()
                   if k in ("rejected", "running", "waiting", "admission_scale")},
    }


# -- soak --------------------------------------------------------------------------------------------
async def soak(app: App, args) -> dict:
    """Minutes of mixed traffic with the replica's memory sampled.

    ``concurrency`` clients for ``duration_s``: chat and completions of four shapes, every
    fifth request dropped after two chunks. RSS of the replica process, MLX active memory
    and prefix-cache bytes are sampled every ``sample_every_s``; reported as start, max,
    end and the slope over the second half."""
    pid = app.pid(next(iter(app.replicas().values())))
    samples: list[dict] = []
    t0 = time.perf_counter()
    stop_at = time.monotonic() + args.duration_s

    async def sample():
        while True:
            s = await app.stats()
            samples.append({"t_s": round(time.perf_counter() - t0, 1), "rss_bytes": rss_bytes(pid),
                            "active_memory_bytes": s["active_memory_bytes"],
                            "prefix_cache_bytes": s["prefix_cache_bytes"],
                            "running": s["running"]})
            if time.monotonic() >= stop_at:
                return
            await asyncio.sleep(args.sample_every_s)

    async with HttpTarget(app.url, MODEL, max_connections=args.concurrency + 8) as http:
        target = RecordingTarget(http)
        sampler = asyncio.create_task(sample())
        shapes = [Workload(requests=500, prompt_tokens=p, max_tokens=m, chat=chat, warmup=0,
                           seed=10 + k).specs()[1]
                  for k, (p, m, chat) in enumerate([(16, 16, True), (128, 64, False),
                                                    (512, 32, True), (64, 256, False)])]
        sent = iter(range(10**9))

        async def client():
            while time.monotonic() < stop_at:
                i = next(sent)
                spec = shapes[i % len(shapes)][i // len(shapes) % 500]
                if i % 5 == 4:
                    await drop_after(target, spec, 2)
                    continue
                try:
                    async for _ in target.stream(spec):
                        pass
                except Exception:
                    pass  # recorded

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        await sampler
    idle = await wait_until_async(lambda s: s["running"] == s["waiting"] == 0, app)
    samples.append({"t_s": round(time.perf_counter() - t0, 1), "rss_bytes": rss_bytes(pid),
                    "active_memory_bytes": idle["active_memory_bytes"],
                    "prefix_cache_bytes": idle["prefix_cache_bytes"], "running": 0})
    return {"duration_s": args.duration_s, "requests": len(target.records),
            "outcomes": counts(target.records), "errors": error_kinds(target.records),
            "rss": _growth(samples, "rss_bytes"),
            "active_net_of_prefix_cache": _growth(
                [{**s, "net": s["active_memory_bytes"] - s["prefix_cache_bytes"]} for s in samples],
                "net"),
            "prefix_cache_bytes_end": idle["prefix_cache_bytes"], "samples": samples}


def _growth(samples: list[dict], key: str) -> dict:
    """Start, max and end in MiB, and the least-squares slope over the second half (MiB/min)."""
    t = np.array([s["t_s"] for s in samples])
    v = np.array([s[key] for s in samples]) / 2**20
    half = t >= t[-1] / 2
    slope = float(np.polyfit(t[half], v[half], 1)[0] * 60) if half.sum() >= 2 else None
    return {"start_mib": round(float(v[0]), 1), "max_mib": round(float(v.max()), 1),
            "end_mib": round(float(v[-1]), 1),
            "slope_second_half_mib_per_min": None if slope is None else round(slope, 2)}


# -- command line ------------------------------------------------------------------------------------
SCENARIOS = {"crash": crash, "disconnect": disconnect, "overload": overload, "soak": soak}


def config_for(args) -> dict:
    """The deployment each scenario needs."""
    if args.scenario == "crash":  # two replicas; more requests than both batches hold
        return chaos_config(args.model, replicas=args.replicas, max_batch_size=args.max_batch_size,
                            max_ongoing=2 * args.max_batch_size)
    if args.scenario == "overload":  # the engine's admission control answers, not Serve's
        return chaos_config(args.model, max_batch_size=args.max_batch_size, max_ongoing=1024,
                            engine={"max_waiting_requests": args.max_waiting_requests})
    if args.scenario == "soak":
        return chaos_config(args.model, max_batch_size=args.max_batch_size,
                            engine={"prompt_cache_bytes": args.prompt_cache_mib * 2**20})
    return chaos_config(args.model, max_batch_size=args.max_batch_size)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="scenario", required=True)
    for name, fn in SCENARIOS.items():
        s = sub.add_parser(name, help=fn.__doc__.splitlines()[0])
        s.add_argument("--model", default=str(REPO / "models" / "demo-small"))
        s.add_argument("--port", type=int, default=0, help="default: a free one")
        s.add_argument("--json", help="write the figures here")
        s.add_argument("--prompt-tokens", type=int, default=32)
        s.add_argument("--max-batch-size", type=int, default=8)
    c = sub.choices
    c["crash"].add_argument("--replicas", type=int, default=2)
    c["crash"].add_argument("--concurrency", type=int, default=24)
    c["crash"].add_argument("--requests", type=int, default=240)
    c["crash"].add_argument("--max-tokens", type=int, default=64)
    c["crash"].add_argument("--kill-after-s", type=float, default=8.0)
    c["disconnect"].add_argument("--clients", type=int, default=100)
    c["disconnect"].add_argument("--keepers", type=int, default=4)
    c["overload"].add_argument("--factor", type=float, default=4.0)
    c["overload"].add_argument("--duration-s", type=float, default=20.0)
    c["overload"].add_argument("--max-tokens", type=int, default=64)
    c["overload"].add_argument("--max-waiting-requests", type=int, default=16)
    c["overload"].add_argument("--baseline-requests", type=int, default=16)
    c["soak"].add_argument("--duration-s", type=float, default=300.0)
    c["soak"].add_argument("--concurrency", type=int, default=8)
    c["soak"].add_argument("--sample-every-s", type=float, default=5.0)
    c["soak"].add_argument("--prompt-cache-mib", type=int, default=16,
                           help="a small prefix cache fills during the run, so it plateaus")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.port:
        args.port = free_port()
    with running_app(config_for(args), args.port) as app:
        figures = asyncio.run(SCENARIOS[args.scenario](app, args))
    report = {"scenario": args.scenario, "machine": machine(), "model": args.model,
              "args": vars(args), "figures": figures}
    shown = {k: v for k, v in figures.items() if k != "samples"}
    print(f"machine: {report['machine']}\nmodel: {args.model}\n{args.scenario}: "
          f"{json.dumps(shown, indent=2)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    ensure_applied()   # this driver's handles talk to the replicas as the Routers do
    sys.exit(main())
