"""Routers that keep every LLMServer replica's queue length fresh (``FreshQueueLengthRouter``).

An application of its own beside the shared one: two Routers and two stable replicas whose
handles route with ``FreshQueueLengthRouter``. Serve's default router learns a replica's queue
length only when its caller sends there, and counts only its own requests finishing: after a
burst, each Router's cache still held 27-32 requests for replicas that had none (run 17 of
docs/BENCHMARKS.md), and Routers then passed those replicas over. With the background refresh,
every Router's view follows the replicas: it comes back to zero once the burst is over.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import httpx
import pytest
from serve_fixtures import side_app_config
from support import wait_until

from mlx_serving.deployments.replica_routing import ROUTER_CLASS

APP = "fresh-routing"
PREFIX = "/fresh-routing"
REFRESH_S = 0.1


@pytest.fixture(scope="module")
def url(serve_app, tmp_path_factory):
    stable = {"deployment": {
        "num_replicas": 2, "max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0},
        "request_router_config": {"request_router_class": ROUTER_CLASS,
                                  "request_router_kwargs": {"refresh_interval_s": REFRESH_S}}}}
    config = side_app_config(serve_app.config, APP, PREFIX,
                             tmp_path_factory.mktemp("fresh-routing-canary"), stable=stable,
                             router={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0}})
    with serve_app.beside(config) as url:
        yield url


def _stream(url: str, api_key: str, i: int) -> int:
    body = {"model": "demo", "messages": [{"role": "user", "content": f"story {i}"}],
            "max_tokens": 24, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {api_key}"}) as r:
        r.read()
        return r.status_code


def _views(serve_app, url: str, seen: dict) -> dict:
    """Ask /admin/routing a few times (it answers from whichever Router takes the call);
    ``seen`` keeps each Router's latest view of the stable variant."""
    for _ in range(6):
        r = httpx.get(f"{url}/admin/routing", timeout=10,
                      headers={"Authorization": f"Bearer {serve_app.operator_token}"})
        assert r.status_code == 200, r.text
        body = r.json()
        if body["variants"]["stable"] is not None:
            seen[body["router"]] = body["variants"]["stable"]
    return seen


def test_every_routers_view_follows_the_replicas_after_a_burst(serve_app, url):
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda i: _stream(url, serve_app.api_key, i), range(36)))
    assert codes == [200] * 36

    seen: dict = {}

    def settled() -> bool:
        # both Routers took part of the burst, so both built a router for the stable
        # variant; each refreshes both replicas and, with nothing in flight, holds 0 for each
        views = _views(serve_app, url, seen)
        return len(views) == 2 and all(len(v["queue_lengths"]) == 2
                                       and set(v["queue_lengths"].values()) == {0}
                                       for v in views.values())

    try:
        wait_until(settled, timeout=30, interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"the Routers' views did not settle at 0: {seen}") from exc
    assert all(v["refresh_interval_s"] == REFRESH_S and v["refreshes"] > 0
               for v in seen.values()), seen


def test_the_routing_view_is_for_operators(serve_app, url):
    r = httpx.get(f"{url}/admin/routing", timeout=10,
                  headers={"Authorization": f"Bearer {serve_app.api_key}"})
    assert r.status_code in (401, 403), r.text
    assert r.json()["error"]["type"]


def test_every_variant_routes_on_fresh_queue_lengths_unless_it_says_otherwise(serve_app):
    # the shared application's cluster config names no request router
    assert _stream(serve_app.url, serve_app.api_key, 0) == 200
    seen: dict = {}
    wait_until(lambda: _views(serve_app, serve_app.url, seen), timeout=30, interval=0.2)
    view = next(iter(seen.values()))
    assert view["refresh_interval_s"] == REFRESH_S and len(view["queue_lengths"]) >= 1, view


# A driver's handle keeps its router after ray.shutdown(); its refresher's actor calls would
# start Ray again in that process (Ray's auto-init), as the test session's own teardown
# found: the refresher stops once Ray is shut down, and never starts Ray itself (the child
# runs with auto-init on, as a user's driver does, and counts the ray.init calls made from
# replica_routing). Ray may also be started again by something else before the refresher
# looks (Serve's own long-poll client did, on the routers' event loop, and joined the test
# session's cluster in CI): the refresher stops then too, since its Ray is gone. "restart"
# does that on the routers' loop, so the refresher never sees Ray down.
AFTER_SHUTDOWN = """
import asyncio, sys, time, traceback, ray
from ray import serve
from mlx_serving.deployments import replica_routing
ray_init, by_refresher = ray.init, []
def counted_init(*args, **kwargs):
    if any(f.filename.endswith("replica_routing.py") for f in traceback.extract_stack()):
        by_refresher.append(1)
    return ray_init(*args, **kwargs)
ray.init = counted_init  # auto-init calls ray.init()
def start_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False)
start_ray()
serve.start(proxy_location="Disabled")  # no HTTP: the session's application holds the ports
@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0},
                  request_router_config={"request_router_class": replica_routing.ROUTER_CLASS,
                                         "request_router_kwargs": {"refresh_interval_s": 0.05}})
class Echo:
    def __call__(self, x):
        return x
@serve.deployment(ray_actor_options={"num_cpus": 0})
class Ingress:  # Serve allows a custom request router on a deployment behind the ingress only
    def __init__(self, echo):
        self.echo = echo
serve.run(Ingress.bind(Echo.bind()), name="echo", route_prefix=None)
handle = serve.get_deployment_handle("Echo", "echo")
assert handle.remote(7).result() == 7
deadline = time.monotonic() + 30
while not replica_routing.routing_views().get("Echo", {}).get("refreshes"):
    assert time.monotonic() < deadline, replica_routing.routing_views()
    time.sleep(0.05)
if sys.argv[1] == "restart":
    async def restart():  # blocks the routers' loop until Ray is up again
        ray.shutdown()
        start_ray()
    router = next(iter(replica_routing._LIVE))
    asyncio.run_coroutine_threadsafe(restart(), router._event_loop).result()
else:
    ray.shutdown()
time.sleep(0.5)   # a round under way when Ray went down ends
rounds = replica_routing.routing_views()["Echo"]["refreshes"]
# Serve's long-poll client may be starting Ray again on the routers' loop (auto-init), which
# holds the refresher back until it is done: give it time to look.
deadline = time.monotonic() + 60
while any(r._refresher is not None for r in replica_routing._LIVE):
    if time.monotonic() > deadline:
        break
    time.sleep(0.05)
time.sleep(0.5)
print("rounds after shutdown:", replica_routing.routing_views()["Echo"]["refreshes"] - rounds)
print("refreshing:", [r._refresher is not None for r in replica_routing._LIVE])
print("Ray started by the refresher:", len(by_refresher))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["shutdown", "restart"])
def test_a_drivers_refresher_stops_when_its_ray_is_gone(tmp_path, how):
    # auto-init on (the test process has it off), and a Ray it starts is the child's own
    env = {**os.environ, "RAY_ENABLE_AUTO_CONNECT": "1", "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, "-c", AFTER_SHUTDOWN, how], capture_output=True,
                          text=True, timeout=240, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("rounds after shutdown: 0\nrefreshing: [False]\nRay started by the refresher: 0"
            in done.stdout), done.stdout + done.stderr[-3000:]
