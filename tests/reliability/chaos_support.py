"""Helpers of the reliability tests: one streamed request as its client saw it, and each
LLMServer replica's engine state and memory as the application reports them.

Everything here observes the deployed application from outside (HTTP, ``/metrics``,
``/admin/streams``, Ray actor names); nothing reaches into a replica's objects.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass

import httpx

DEPLOYMENT = "LLMServer-stable"

# Engine gauges of each replica, pushed to Telemetry once a second (short name -> metric).
GAUGES = {
    "running": "mlx_serving:num_requests_running",
    "waiting": "mlx_serving:num_requests_waiting",
    "paused": "mlx_serving:num_requests_paused",
    "in_batch": "mlx_serving:batch_size",
    "kv_reserved": "mlx_serving:kv_cache_reserved_bytes",
    "active_memory": "mlx_serving:mlx_active_memory_bytes",
    "prefix_cache": "mlx_serving:prefix_cache_bytes",
    "healthy": "mlx_serving:engine_healthy",
    "rejected": "mlx_serving:admission_rejected_total",
}
IDLE_GAUGES = ("running", "waiting", "paused", "in_batch", "kv_reserved")

_SAMPLE = re.compile(r'^(?P<name>[^{\s]+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class StreamOutcome:
    """How one streamed request ended, as its client saw it."""

    status: int | None = None          # None: no response at all
    retry_after: str | None = None
    error: dict | None = None          # the error body (non-2xx) or the final error event
    chunks: int = 0                    # chunks that carried text
    completion_tokens: int | None = None  # from the final usage chunk
    done: bool = False                 # ended with data: [DONE]
    dropped: bool = False              # this client hung up on purpose, mid-stream
    transport: str | None = None       # the connection failed under the client
    hung: bool = False                 # no end within the client's patience
    ttft_s: float | None = None        # from sending to the first text chunk

    @property
    def kind(self) -> str:
        """completed | error_event | refused (an error status with an OpenAI error body) |
        dropped | hung | lost (anything else: cut off, or an answer without a reason)."""
        if self.hung:
            return "hung"
        if self.transport is not None:
            return "lost"
        if self.status == 200:
            if self.dropped and self.chunks:
                return "dropped"
            if self.done and self.error is None:
                return "completed"
            if self.error is not None and not self.done:
                return "error_event"
        elif self.status is not None and self.status >= 400 and self.error is not None:
            return "refused"
        return "lost"


async def stream_once(http: httpx.AsyncClient, app, body: dict, *, headers: dict | None = None,
                      drop_after: int | None = None, patience_s: float = 180.0) -> StreamOutcome:
    """POST a streaming request (chat if ``body`` has messages) and read it to its end, or
    hang up after ``drop_after`` text chunks; never raises: every way it ends is an
    outcome. ``patience_s`` bounds the wait: past it the request counts as hung."""
    out = StreamOutcome()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"

    async def read() -> None:
        body_ = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", f"{app.url}{path}", json=body_,
                               headers={**app.headers(), **(headers or {})}) as r:
            out.status, out.retry_after = r.status_code, r.headers.get("retry-after")
            if r.status_code != 200:
                out.error = json.loads(await r.aread()).get("error")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    out.error = event["error"]
                    continue
                if event.get("usage"):
                    out.completion_tokens = event["usage"]["completion_tokens"]
                if any((c.get("delta") or {}).get("content") or c.get("text")
                       for c in event.get("choices") or ()):
                    out.chunks += 1
                    if out.ttft_s is None:
                        out.ttft_s = time.perf_counter() - sent
                    if drop_after is not None and out.chunks >= drop_after:
                        out.dropped = True
                        return  # leaving the block closes the connection mid-stream

    sent = time.perf_counter()
    try:
        await asyncio.wait_for(read(), patience_s)
    except asyncio.TimeoutError:
        out.hung = True
    except httpx.HTTPError as exc:
        out.transport = repr(exc)
    return out


def completion(tag: str, max_tokens: int, **fields) -> dict:
    """A completions body that generates exactly ``max_tokens`` tokens."""
    return {"model": "demo", "prompt": f"reliability {tag}", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, **fields}


def live_replicas(app) -> set[str]:
    return set(app.replica_actors(DEPLOYMENT))


def engine_gauges(app) -> dict[str, dict[str, float]]:
    """Live stable replica id -> its engine gauges (GAUGES' short names), from /metrics.

    A replica pushes its gauges once a second; a dead one lingers in /metrics for a few
    seconds, so only replicas alive now are returned.
    """
    names = {metric: short for short, metric in GAUGES.items()}
    live = live_replicas(app)
    text = httpx.get(f"{app.url}/metrics", timeout=10).text
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m["name"] not in names:
            continue
        labels = dict(_LABEL.findall(m["labels"]))
        if labels.get("variant") == "stable" and labels.get("replica") in live:
            found.setdefault(labels["replica"], {})[names[m["name"]]] = float(m["value"])
    return found


def admin_streams(app) -> list[dict]:
    r = httpx.get(f"{app.url}/admin/streams", timeout=10,
                  headers={"Authorization": f"Bearer {app.operator_token}"})
    return r.json()["streams"]


def wait_idle(app, replicas: int = 2, timeout: float = 60.0) -> dict[str, dict[str, float]]:
    """Wait until ``replicas`` live replicas report an empty engine (nothing running,
    waiting, paused, in mlx-lm's batch or holding KV) and no stream is open; returns their
    gauges then (the last ones seen on timeout: the caller's asserts say what is left)."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = engine_gauges(app)
        idle = (len(gauges) == replicas
                and all(g.get(k, -1) == 0 for g in gauges.values() for k in IDLE_GAUGES))
        if (idle and not admin_streams(app)) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.5)


def memory_net_of_prefix_cache(gauges: dict[str, dict[str, float]]) -> dict[str, float]:
    """Replica -> MLX active memory minus what its prefix cache holds (the cache keeps
    finished sequences' KV on purpose, up to prompt_cache_bytes)."""
    return {r: g["active_memory"] - g["prefix_cache"] for r, g in gauges.items()}


def replica_pids(app) -> dict[str, int]:
    """Live stable replica id -> its process id."""
    import ray

    return {replica: ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(
                lambda self: os.getpid()), timeout=30)
            for replica, name in app.replica_actors(DEPLOYMENT).items()}


def qos_normal(app) -> bool:
    """The QoS monitor asks the stable variant for neither lowered admission nor batch
    shedding (what it does while an SLO is violated, and for recover_after_s after)."""
    text = httpx.get(f"{app.url}/metrics", timeout=10).text
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and 'variant="stable"' in m["labels"]:
            if m["name"] == "mlx_serving:qos_admission_scale" and float(m["value"]) != 1.0:
                return False
            if m["name"] == "mlx_serving:qos_shed_batch" and float(m["value"]) != 0.0:
                return False
    return True
