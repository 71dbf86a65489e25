"""One Ray cluster of two simulated machines for every test that needs Ray (tests/e2e and
tests/reliability), with the real application deployed on it from ``cluster.yaml`` (test
overrides applied) by ``serve run``. Registered as a plugin by tests/conftest.py, so the
session-scoped cluster is shared by both folders."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SERVE = str(Path(sys.executable).with_name("serve"))
# The secrets reach the replicas as docs/DEPLOYMENT.md says they should: through the
# environment of every node's Ray processes (MLX_SERVING_API_KEYS, MLX_SERVING_OPERATOR_TOKEN),
# never through the config, which Serve logs. One more key comes from the config, so that
# path is served too (tests/reliability/test_secrets.py).
API_KEY = "test-api-key-from-the-environment"
OPERATOR_TOKEN = "test-operator-token-from-the-environment"
CONFIG_API_KEY = "test-api-key-from-the-config"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_config(model_path: Path, port: int, state_dir: Path) -> dict:
    """cluster.yaml with the tiny model, keys, one stable LLMServer replica per machine (a
    small engine batch and queue) and a declared canary variant of the same shape (same
    model and engine, two replicas anywhere) for the rollout drills."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    args = app["args"]
    args["api_keys"] = [CONFIG_API_KEY]
    args["router"]["num_replicas"] = 2
    stable = args["variants"]["stable"]
    stable["engine"]["models"][0]["path"] = str(model_path)
    # A small batch and queue, so that tests/reliability reaches the engine's own bounds
    # (its 429s) with a few dozen clients. The queue holds at least max_ongoing_requests:
    # at the deployment's own limits only Serve's queue refuses (503), as the e2e test of
    # a full Serve queue expects.
    stable["engine"].update(max_batch_size=4, prefill_batch_size=4, max_waiting_requests=8)
    stable["deployment"] = {
        "num_replicas": 2,
        "max_ongoing_requests": 8,
        "max_queued_requests": 4,
        "health_check_period_s": 1,
        "ray_actor_options": {"num_cpus": 0.5, "resources": {"mac": 1}},
    }
    args["variants"]["canary"] = {
        # Stable's shape (engine, replica count, engine in the replica): the drills' A/B
        # analysis must see two equal variants. A single canary replica taking up to half of
        # the traffic, or one running its engine in a child process, is measurably slower on
        # a 2-core machine, and the analysis rightly rolled such a "healthy" canary back.
        # tests/e2e/test_engine_process.py covers the child-process engine under Serve.
        "engine": stable["engine"],
        "deployment": {"num_replicas": 2, "max_ongoing_requests": 16, "max_queued_requests": 64,
                       "health_check_period_s": 1, "ray_actor_options": {"num_cpus": 0.25}},
    }
    args["canary"] = {"state_dir": str(state_dir), "tick_interval_s": 0.25}
    # The drills test the rollout's statistics and guards on their own, and other tests
    # inject latency and faults: the QoS monitor would act on both (roll the canary back,
    # shed batch requests). Its behaviour is tested in tests/test_rollout_controller.py.
    args["qos"] = {"enabled": False}
    return config


def side_app_config(base: dict, name: str, prefix: str, state_dir: Path,
                    stable: dict | None = None, **args) -> dict:
    """An application of its own, to deploy beside the shared one (``ServeApp.beside``):
    the shared application's args with one Router and one stable LLMServer replica (no CPUs
    reserved), no canary variant, its own canary state, served under ``prefix``. ``stable``
    updates the stable variant; other keywords replace entries of the args."""
    app = copy.deepcopy(base["applications"][0])
    app["name"], app["route_prefix"] = name, prefix
    app.pop("deployments", None)
    app_args = app["args"]
    app_args["canary"] = {"state_dir": str(state_dir)}
    app_args["router"] = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}
    variant = app_args["variants"]["stable"]
    variant["deployment"] = {"num_replicas": 1, "max_ongoing_requests": 16,
                             "ray_actor_options": {"num_cpus": 0}}
    variant.update(stable or {})
    app_args["variants"] = {"stable": variant}
    app_args.update(args)
    return app


class ServeApp:
    """The deployed application as a client sees it."""

    def __init__(self, address: str, port: int, config: dict, config_path: Path):
        self.ray_address = address
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = API_KEY
        self.operator_token = OPERATOR_TOKEN
        self.config = config
        self.config_path = config_path

    def deploy(self, deployment_overrides: list[dict] | None = None,
               extra_apps: list[dict] | None = None, timeout: float = 180.0) -> None:
        """(Re)deploy the config with ``serve run``; overrides go to its `deployments:` list.
        ``extra_apps`` are deployed beside it (a config lists every application: a later
        deploy without them removes them again). Returns once Serve runs the new config with
        every deployment healthy: ``serve run --non-blocking`` returns when the config is
        submitted, and /ready still answers from the old replicas meanwhile.

        Serve applies a changed user_config or max_ongoing_requests of a listed deployment
        in place, without restarting replicas. The list always names every variant's
        LLMServer: Serve derives a listed deployment's actor options differently (it merges
        the app's runtime_env into them), so listing one only while it has an override
        restarts its replicas at both changes."""
        submitted = time.time()
        config = {**self.config, "applications": [dict(self.config["applications"][0])]}
        entries = {name: {"name": name} for name in self.server_deployments}
        entries.update({o["name"]: o for o in deployment_overrides or []})
        config["applications"][0]["deployments"] = list(entries.values())
        config["applications"] += extra_apps or []
        self.config_path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run([SERVE, "run", "--non-blocking", "-a", self.ray_address,
                        str(self.config_path)], check=True, env=env, cwd=REPO, timeout=300)
        self._wait_settled([a["name"] for a in config["applications"]], submitted, timeout)
        self.wait_ready()

    @property
    def server_deployments(self) -> list[str]:
        """The shared application's LLMServer deployments, one per variant."""
        from mlx_serving.deployments.app import server_deployment_name

        variants = self.config["applications"][0]["args"]["variants"]
        return [server_deployment_name(name) for name in variants]

    @staticmethod
    def _wait_settled(apps: list[str], submitted: float, timeout: float) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout
        while True:
            statuses = serve.status().applications
            if all(app in statuses and statuses[app].last_deployed_time_s >= submitted - 1
                   and statuses[app].status == "RUNNING"
                   and all(d.status == "HEALTHY" for d in statuses[app].deployments.values())
                   for app in apps):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the deployed config did not settle in {timeout:.0f} s: "
                                   f"{ {app: statuses.get(app) for app in apps} }")
            time.sleep(0.5)

    def admin(self, method: str, path: str, body: dict | None = None) -> dict:
        r = httpx.request(method, f"{self.url}{path}", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {self.operator_token}"})
        assert r.status_code < 400, r.text
        return r.json()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def metric(self, name: str) -> float:
        """Sum of a metric's samples over the application (all replicas)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def replica_actors(self, deployment: str = "LLMServer-stable") -> dict[str, str]:
        """Replica id -> Ray actor name of a deployment's live replicas."""
        import ray

        prefix = f"SERVE_REPLICA::mlx-serving#{deployment}#"
        return {a["name"].removeprefix(prefix): a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(prefix)}

    def wait_ready(self, url: str | None = None, timeout: float = 180.0) -> None:
        """Until the application at ``url`` (the shared one by default) answers /ready."""
        url = url or self.url
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the application at {url} did not become ready")

    @contextmanager
    def beside(self, app_config: dict) -> Iterator[str]:
        """Deploy ``app_config`` (``side_app_config``) beside the shared application;
        yields its URL once ready, and removes it again afterwards."""
        self.deploy(extra_apps=[app_config])
        try:
            url = f"{self.url}{app_config['route_prefix']}"
            self.wait_ready(url)
            yield url
        finally:
            self.deploy()   # the shared application alone again


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    secrets = {"MLX_SERVING_API_KEYS": API_KEY, "MLX_SERVING_OPERATOR_TOKEN": OPERATOR_TOKEN}
    saved = {k: os.environ.get(k) for k in secrets}
    os.environ.update(secrets)  # inherited by the nodes' raylets, hence by every worker
    try:
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 2, "resources": {"mac": 1}})
        cluster.add_node(num_cpus=2, resources={"mac": 1})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def serve_app(ray_cluster, tiny_model_path, tmp_path_factory) -> ServeApp:
    port = free_port()
    folder = tmp_path_factory.mktemp("serve")
    config = test_config(tiny_model_path, port, folder / "canary-state")
    app = ServeApp(ray_cluster.address, port, config, folder / "cluster.yaml")
    app.deploy()
    yield app
    from ray import serve
    serve.shutdown()
