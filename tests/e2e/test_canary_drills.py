"""Canary rollouts on real Ray Serve: statistical and guard rollbacks, promotion, restarts,
operator commands through the CLI, feature flags, and the admin API's token checks.

The drills use small plans (stated in each test) so they decide in seconds on a CPU box;
the statistics are the same code the default plan runs (docs/CANARY.md).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import httpx
import pytest
import ray
import yaml

from mlx_serving.deployments.cli import main as cli

pytestmark = pytest.mark.slow

GUARDS_OFF = {"enabled": False}
ONLY_TTFT = {"ttft": {"margin": 0.25}, "itl": {"enabled": False}, "e2e": {"enabled": False},
             "error_rate": {"enabled": False}, "min_samples": 30}


def plan_file(tmp_path, stages, analysis=None, guards=None) -> str:
    plan = {"stages": stages, "analysis": analysis or ONLY_TTFT, "guards": guards or GUARDS_OFF}
    path = tmp_path / f"plan-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


def run_cli(app, *args, capsys=None) -> str:
    code = cli(["canary", *args, "--url", app.url, "--token", app.operator_token])
    out = capsys.readouterr().out if capsys is not None else ""
    assert code == 0, out
    return out


def status(app) -> dict:
    return app.admin("GET", "/admin/canary/status")


def phase(app) -> str | None:
    rollout = status(app)["rollout"]
    return rollout["phase"] if rollout else None


def restore_stable(app, tmp_path, capsys) -> None:
    """Hand all traffic back to the "stable" variant whatever a drill left behind: roll back
    a live rollout (progressing or paused) and, if another variant was promoted, roll
    "stable" out again at once, so that later tests do not send traffic to the canary."""
    if phase(app) in ("progressing", "paused"):
        run_cli(app, "rollback", "--reason", "drill cleanup", capsys=capsys)
    if status(app)["routing"]["stable"] != "stable":
        plan = plan_file(tmp_path, [{"weight": 50, "min_samples": 10, "min_duration_s": 1},
                                    {"weight": 100, "min_samples": 10, "min_duration_s": 1}])
        run_cli(app, "start", "stable", "--plan", plan, capsys=capsys)
        run_cli(app, "promote", "--full", capsys=capsys)


async def _drive(app, until, timeout_s: float, concurrency: int = 4) -> list[dict]:
    """Send small completions (random user keys) until ``until()`` holds; returns results."""
    results: list[dict] = []
    deadline = time.monotonic() + timeout_s
    done = asyncio.Event()

    async def worker(http):
        while not done.is_set() and time.monotonic() < deadline:
            started = time.perf_counter()
            r = await http.post(f"{app.url}/v1/completions", json={
                "model": "demo", "prompt": "canary drill", "max_tokens": 4,
                "ignore_eos": True, "user": uuid.uuid4().hex})
            results.append({"status": r.status_code, "variant": r.headers.get("x-mlx-serving-variant"),
                            "latency": time.perf_counter() - started})

    async def watch():
        while time.monotonic() < deadline:
            if await asyncio.to_thread(until):
                break
            await asyncio.sleep(0.5)
        done.set()

    async with httpx.AsyncClient(timeout=60, headers=app.headers()) as http:
        await asyncio.gather(watch(), *(worker(http) for _ in range(concurrency)))
    return results


def drive(app, until, timeout_s: float = 240.0, concurrency: int = 4) -> list[dict]:
    return asyncio.run(_drive(app, until, timeout_s, concurrency))


def router_states() -> dict[str, dict]:
    """Each Router replica's routing version and long-poll state (by replica id)."""
    from ray import serve

    handle = serve.get_deployment_handle("Router", "mlx-serving")
    states = {}
    for _ in range(12):  # calls land on either replica
        state = handle.routing_state.remote().result(timeout_s=30)
        states[state["replica"]] = state
    return states


def variants_of(app, n: int = 30) -> set[str]:
    """Variants serving ``n`` requests sent once every Router has the controller's current
    routing table (the update reaches them by long-poll; waited for, at most 15 s)."""
    version = status(app)["routing"]["version"]

    def send():
        r = httpx.post(f"{app.url}/v1/completions", headers=app.headers(), timeout=60,
                       json={"model": "demo", "prompt": "after", "max_tokens": 2,
                             "user": uuid.uuid4().hex})
        assert r.status_code == 200, r.text
        return r.headers["x-mlx-serving-variant"], int(r.headers["x-mlx-serving-routing"].split("@")[1])

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(send()[1] < version for _ in range(6)):
        time.sleep(0.2)
    results = [send() for _ in range(n)]
    assert all(v >= version for _, v in results), (
        f"a Router kept an old routing table for over 15 s (controller version {version}; "
        f"Routers: {router_states()})")
    return {variant for variant, _ in results}


def set_canary_fault(app, **fault) -> None:
    """Redeploy with fault injection on the canary's LLMServer (a live user_config change)."""
    overrides = [{"name": "LLMServer-canary", "user_config": {"fault": fault}}] if fault else None
    app.deploy(overrides)


async def _stable_ttfts(app, n: int, concurrency: int) -> list[float]:
    ttfts: list[float] = []

    async def client(http):
        while len(ttfts) < n:
            started = time.perf_counter()
            async with http.stream("POST", f"{app.url}/v1/completions", json={
                    "model": "demo", "prompt": "canary drill", "max_tokens": 4,
                    "ignore_eos": True, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and '"text":"' in line and '"text":""' not in line:
                        ttfts.append(time.perf_counter() - started)
                        break

    async with httpx.AsyncClient(timeout=60, headers=app.headers()) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return ttfts


def stable_median_ttft(app, concurrency: int = 4) -> float:
    """Median TTFT of the stable variant under the drill's load (``drive``'s concurrency),
    measured by the client before any rollout."""
    return statistics.median(asyncio.run(_stable_ttfts(app, 60, concurrency)))


def test_admin_api_needs_the_operator_token(serve_app):
    url = f"{serve_app.url}/admin/canary/status"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 403
    r = httpx.post(f"{serve_app.url}/admin/canary/start", json={"variant": "canary"},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and phase(serve_app) in (None, "rolled_back", "promoted")
    assert cli(["canary", "status", "--url", serve_app.url, "--token", "wrong"]) == 1


def test_a_fault_reaches_the_canary_in_place_before_the_deploy_returns(serve_app):
    # The drills start their rollout right after set_canary_fault. The deploy used to return
    # while the canary was still UPDATING, and listing the canary's deployment only while it
    # had an override restarted its replicas at both changes: a rollout's first samples came
    # from replicas without the fault, and the latency drill was sometimes promoted.
    from ray import serve

    replicas = serve_app.replica_actors("LLMServer-canary")
    set_canary_fault(serve_app, delay_ms=1)
    try:
        app = serve.status().applications["mlx-serving"]
        assert app.status == "RUNNING" and all(
            d.status == "HEALTHY" for d in app.deployments.values()), app
        assert serve_app.replica_actors("LLMServer-canary") == replicas
    finally:
        set_canary_fault(serve_app)
    assert serve_app.replica_actors("LLMServer-canary") == replicas


def test_latency_regression_is_rolled_back_by_the_statistics(serve_app, tmp_path, capsys):
    # +100% of stable's median TTFT at the drill's concurrency, measured before the rollout:
    # four times the plan's 25% TTFT margin. Guards are off (``plan_file``): this drill is
    # about the statistics.
    median = stable_median_ttft(serve_app)
    delay_ms = 1.0 * median * 1000
    set_canary_fault(serve_app, delay_ms=delay_ms)
    try:
        plan = plan_file(tmp_path, [
            {"weight": 50, "min_samples": 150, "min_duration_s": 3, "max_extensions": 2},
            {"weight": 100, "min_samples": 10, "min_duration_s": 1}])
        run_cli(serve_app, "start", "canary", "--plan", plan, capsys=capsys)
        drive(serve_app, lambda: phase(serve_app) == "rolled_back")
        st = status(serve_app)
        assert st["rollout"]["phase"] == "rolled_back", st
        analysis = st["rollout"]["last_analysis"]
        assert analysis["outcome"] == "fail"                      # the statistics, not a guard
        assert st["routing"]["canary"] is None and st["routing"]["weight"] == 0
        assert variants_of(serve_app) == {"stable"}               # every request to stable
        routers = router_states()
        assert len(routers) == 2 and all(r["watching"] and r["polls"] > 0
                                         and r["version"] == st["routing"]["version"]
                                         for r in routers.values()), routers
        out = run_cli(serve_app, "status", capsys=capsys)
        assert "rolled_back" in out and "ttft" in out
        history = run_cli(serve_app, "history", capsys=capsys)
        assert "rollback" in history
    finally:
        restore_stable(serve_app, tmp_path, capsys)
        set_canary_fault(serve_app)


def test_guard_sized_fault_is_rolled_back_by_the_guard(serve_app, tmp_path, capsys):
    set_canary_fault(serve_app, abort_percent=20)
    try:
        plan = plan_file(tmp_path, [
            {"weight": 50, "min_samples": 10_000, "min_duration_s": 600},
            {"weight": 100, "min_samples": 10, "min_duration_s": 1}],
            guards={"error_rate": {"ceiling": 0.05, "min_samples": 20},
                    "ttft_p95": {"enabled": False}})
        run_cli(serve_app, "start", "canary", "--plan", plan, capsys=capsys)
        results = drive(serve_app, lambda: phase(serve_app) == "rolled_back", timeout_s=120)
        st = status(serve_app)
        assert st["rollout"]["phase"] == "rolled_back", st
        assert "guard" in st["rollout"]["reason"].lower()
        assert any(r["status"] == 500 and r["variant"] == "canary" for r in results)
        assert variants_of(serve_app) == {"stable"}
    finally:
        restore_stable(serve_app, tmp_path, capsys)
        set_canary_fault(serve_app)


def _kill(app, deployment: str) -> None:
    for name in app.replica_actors(deployment).values():
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def test_restart_mid_rollout_resumes_the_same_stage(serve_app, tmp_path, capsys):
    plan = plan_file(tmp_path, [
        {"weight": 25, "min_samples": 10_000, "min_duration_s": 3600},
        {"weight": 100, "min_samples": 10, "min_duration_s": 1}])
    run_cli(serve_app, "start", "canary", "--plan", plan, capsys=capsys)
    before = status(serve_app)["rollout"]
    assert before["phase"] == "progressing" and before["weight"] == 25
    run_cli(serve_app, "pause", "--reason", "drill", capsys=capsys)
    assert phase(serve_app) == "paused"
    run_cli(serve_app, "resume", capsys=capsys)
    _kill(serve_app, "RolloutController")
    _kill(serve_app, "Router")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            after = status(serve_app)["rollout"]
            break
        except (AssertionError, httpx.HTTPError):
            time.sleep(0.5)
    assert after["rollout_id"] == before["rollout_id"]
    assert after["stage_index"] == before["stage_index"] and after["phase"] == "progressing"
    assert after["weight"] == 25
    assert variants_of(serve_app, 40) == {"stable", "canary"}   # the split survived
    out = run_cli(serve_app, "rollback", "--reason", "drill over", capsys=capsys)
    assert "rolled_back" in out
    assert variants_of(serve_app) == {"stable"}


def test_healthy_canary_is_promoted_through_every_stage(serve_app, tmp_path, capsys):
    # Two extensions per stage: with both variants on the 2 cores of a CI box, the upper
    # bound of the TTFT ratio over 60 samples reached 1.20 against the 1.25 margin, and two
    # looks in a row came out inconclusive (the rollout paused) in 2 of 9 runs (2026-11-27).
    plan = plan_file(tmp_path, [
        {"weight": 25, "min_samples": 60, "min_duration_s": 2, "max_extensions": 2},
        {"weight": 50, "min_samples": 60, "min_duration_s": 2, "max_extensions": 2},
        {"weight": 100, "min_samples": 10, "min_duration_s": 2}])
    run_cli(serve_app, "start", "canary", "--plan", plan, capsys=capsys)
    try:
        drive(serve_app, lambda: phase(serve_app) in ("promoted", "rolled_back", "paused"))
        st = status(serve_app)
        assert st["rollout"]["phase"] == "promoted", st
        assert st["routing"]["stable"] == "canary"               # the canary is stable now
        assert variants_of(serve_app) == {"canary"}
        history = serve_app.admin("GET", "/admin/canary/history?limit=50")
        rollout_id = st["rollout"]["rollout_id"]
        actions = [d["action"] for d in history if d["rollout_id"] == rollout_id]
        assert actions[0] == "start" and actions[-1] == "promote"
        assert actions.count("next_stage") == 2 and "rollback" not in actions
        # A later rollout that is rolled back leaves the promoted variant stable.
        run_cli(serve_app, "start", "stable", "--plan", plan, capsys=capsys)
        run_cli(serve_app, "rollback", capsys=capsys)
        assert status(serve_app)["routing"]["stable"] == "canary"
    finally:
        restore_stable(serve_app, tmp_path, capsys)   # exercises promote --full
    assert status(serve_app)["routing"]["stable"] == "stable"
    assert variants_of(serve_app) == {"stable"}


def test_feature_flags_through_the_cli(serve_app, capsys):
    base = ["--url", serve_app.url, "--token", serve_app.operator_token]
    assert cli(["flags", "set", "fast-path", "--percent", "100", *base]) == 0
    assert "fast-path" in capsys.readouterr().out
    r = httpx.post(f"{serve_app.url}/v1/completions", headers=serve_app.headers(), timeout=60,
                   json={"model": "demo", "prompt": "x", "max_tokens": 1, "user": "u1"})
    time.sleep(0.1)
    assert "fast-path" in r.headers.get("x-mlx-serving-flags", "")
    assert cli(["flags", "kill", "fast-path", *base]) == 0
    assert "yes" in capsys.readouterr().out
    r = httpx.post(f"{serve_app.url}/v1/completions", headers=serve_app.headers(), timeout=60,
                   json={"model": "demo", "prompt": "x", "max_tokens": 1, "user": "u1"})
    assert "fast-path" not in r.headers.get("x-mlx-serving-flags", "")
    assert cli(["flags", "delete", "fast-path", *base]) == 0
