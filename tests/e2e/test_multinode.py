"""Two simulated machines, one LLMServer replica on each (custom resource "mac")."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import ray

APP = "mlx-serving"
DEPLOYMENT = "LLMServer-stable"


def active_streams(app) -> list[dict]:
    r = httpx.get(f"{app.url}/admin/streams",
                  headers={"Authorization": f"Bearer {app.operator_token}"}, timeout=10)
    return r.json()["streams"]


async def read_stream(http: httpx.AsyncClient, app, tokens: int, tag: str) -> dict:
    """Stream a completion; returns the events seen and whether it ended with [DONE]."""
    body = {"model": "demo", "prompt": f"stream {tag}", "max_tokens": tokens,
            "ignore_eos": True, "stream": True}
    events, done = [], False
    async with http.stream("POST", f"{app.url}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
            else:
                events.append(json.loads(data))
    return {"events": events, "done": done}


def test_replicas_land_on_different_nodes(serve_app):
    nodes = set()
    for name in serve_app.replica_actors().values():
        actor = ray.get_actor(name, namespace="serve")
        nodes.add(ray.get(actor.__ray_call__.remote(
            lambda self: ray.get_runtime_context().get_node_id())))
    assert len(nodes) == 2


def test_openblas_preload_reaches_the_replicas(serve_app):
    """make/cluster.yaml set LD_PRELOAD for the shell; Ray starts replicas itself."""
    from ray import serve

    from mlx_serving.engine.blas import openblas_path

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    info = handle.info.remote().result(timeout_s=30)
    assert info["openblas_preloaded"] == (openblas_path() is not None)


def test_the_serving_path_runs_at_the_default_niceness_not_rays_15(serve_app):
    """Ray starts workers at niceness 15; the engine and the Routers must not yield to every
    other process on the machine (deployments/app.py, SERVING_ENV)."""
    from ray import serve

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    info = handle.info.remote().result(timeout_s=30)
    assert info["engine_pid"] == info["pid"]
    assert info["engine_niceness"] == 0
    routers = serve_app.replica_actors("Router").values()
    assert len(routers) == 2
    for name in routers:
        actor = ray.get_actor(name, namespace="serve")
        assert ray.get(actor.__ray_call__.remote(lambda self: os.nice(0))) == 0


def test_concurrent_requests_use_both_replicas_and_survive_a_replica_kill(serve_app):
    async def scenario():
        async with httpx.AsyncClient(timeout=120, headers=serve_app.headers()) as http:
            tasks = [asyncio.create_task(read_stream(http, serve_app, 100_000, str(i)))
                     for i in range(6)]
            # Wait until every stream is producing tokens, then see who serves what.
            deadline = time.monotonic() + 30
            streams = []
            while time.monotonic() < deadline:
                streams = [s for s in active_streams(serve_app) if s["tokens"] > 0 and s["replica"]]
                if len(streams) == 6:
                    break
                await asyncio.sleep(0.25)
            serving = {s["replica"] for s in streams}
            assert len(serving) == 2, streams  # both replicas serve concurrent requests
            victim = sorted(serving)[0]
            on_victim = sum(s["replica"] == victim for s in streams)
            ray.kill(ray.get_actor(serve_app.replica_actors()[victim], namespace="serve"), no_restart=True)
            # Streams on the killed replica end with an error event; the others run on.
            # Cancel the survivors once the victims are accounted for.
            finished = []
            while len(finished) < on_victim:
                done, _ = await asyncio.wait([t for t in tasks if not t.done()], timeout=60,
                                             return_when=asyncio.FIRST_COMPLETED)
                assert done, "a stream on the killed replica hangs"
                finished += [t.result() for t in done]
            for t in tasks:
                t.cancel()
            return finished, victim

    finished, victim = asyncio.run(scenario())
    for result in finished:
        assert not result["done"]                         # no [DONE] after a failure
        assert "error" in result["events"][-1]            # one error event ends it
        assert result["events"][-1]["error"]["type"] == "service_unavailable_error"

    # Serve replaces the replica; requests succeed again and both replicas serve.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        replicas = serve_app.replica_actors()
        if len(replicas) == 2 and victim not in replicas:
            break
        time.sleep(0.5)
    assert len(serve_app.replica_actors()) == 2 and victim not in serve_app.replica_actors()
    serve_app.wait_ready()
    ok = 0
    for i in range(6):
        r = httpx.post(f"{serve_app.url}/v1/completions", headers=serve_app.headers(), timeout=60,
                       json={"model": "demo", "prompt": f"after {i}", "max_tokens": 4})
        ok += r.status_code == 200
    assert ok == 6
