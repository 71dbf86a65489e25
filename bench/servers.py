"""The servers a benchmark compares, each started on the same model on loopback.

- ``ours``: this project's application (``cluster.yaml``'s stable variant serving the
  model) under ``serve run``, with its shipped defaults unless overridden;
- ``mlx_lm``: ``python -m mlx_lm server``, mlx-lm's own OpenAI-compatible server;
- any other running endpoint, given by URL (``Endpoint`` directly).

Both started servers get the same environment: offline hub and, on the Linux CPU
backend, OpenBLAS preloaded (``mlx_serving.engine.blas``), as the replicas get it.
``max_batch_size`` sets both batch sizes alike: our engine's ``max_batch_size`` and
mlx_lm.server's ``--decode-concurrency`` (their defaults are both 32, with prompt batches
of 8: ``prefill_batch_size`` and ``--prompt-concurrency``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx
import yaml

from mlx_serving.deployments.serve_env import serve_env
from mlx_serving.engine.blas import preload_env

REPO = Path(__file__).resolve().parent.parent
SERVER_NAMES = {"ours": "mlx-serving", "mlx_lm": "mlx_lm.server"}


@dataclass
class Endpoint:
    """An OpenAI-compatible endpoint to load: where it is, the model name to ask for, and
    fields to add to every request body."""

    name: str
    url: str
    model: str
    extra_body: dict = field(default_factory=dict)
    command: str = ""  # how it was started, for the record


@dataclass(frozen=True)
class ServerOptions:
    """How the started servers are configured (the same model and batch size for all).

    ``replicas`` and ``gpus_per_replica`` apply to ours (LLMServer replicas, each with
    that many GPUs in ``ray_actor_options``); ``engine`` overrides our engine settings,
    ``deployment`` our replicas' Serve deployment options (after every other setting),
    and ``mlx_lm_args`` are extra command-line arguments for mlx_lm.server.
    ``max_concurrency`` is the most requests the sweep keeps in flight: our queue bounds
    are raised to hold them all and the QoS monitor only alerts, so that a level beyond
    the batch queues (as it does on mlx_lm.server) instead of being refused with 429.
    """

    model_path: str
    max_batch_size: int | None = None
    replicas: int = 1
    gpus_per_replica: float | None = None
    engine: dict = field(default_factory=dict)
    deployment: dict = field(default_factory=dict)
    mlx_lm_args: tuple[str, ...] = ()
    startup_timeout_s: float = 600.0
    max_concurrency: int | None = None


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The `serve` CLI through this interpreter (works where its script is not on PATH).
SERVE_CLI = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]


def is_ready(url: str) -> bool:
    """Whether the application at ``url`` answers ``/ready`` with 200."""
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def completes(url: str, model: str) -> bool:
    """Whether the server at ``url`` completes a one-token request for ``model`` (the
    readiness of a server without a ``/ready``, such as mlx_lm.server)."""
    try:
        return httpx.post(f"{url}/v1/completions", timeout=60,
                          json={"model": model, "prompt": "hello", "max_tokens": 1}
                          ).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(ready: Callable[[], bool], timeout_s: float,
               gave_up: Callable[[], bool] = lambda: False, interval_s: float = 1.0) -> bool:
    """Poll ``ready()``: True once it holds, False after ``timeout_s`` or as soon as
    ``gave_up()`` says there is no point (the server process ended, say)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if gave_up() or time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def wait_ready(url: str, timeout_s: float) -> bool:
    """Until the application at ``url`` answers ``/ready`` (True) or ``timeout_s`` passes."""
    return wait_until(lambda: is_ready(url), timeout_s)


def deploy(config: dict, address: str) -> str:
    """Submit ``config`` with ``serve run --non-blocking`` to the Ray cluster at ``address``
    (its GCS address); returns the application's URL (not ready yet)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    try:
        # Output to /dev/null: a pipe would be held open by the processes the CLI starts.
        subprocess.run([*SERVE_CLI, "run", "--non-blocking", "-a", address, f.name], check=True,
                       cwd=REPO, env=server_env(), timeout=600, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    finally:
        os.unlink(f.name)
    return f"http://127.0.0.1:{config['http_options']['port']}"


def server_env() -> dict[str, str]:
    """The environment of a started server: this one, offline, OpenBLAS preloaded, and
    Serve's high-throughput mode where it runs (``make run``'s)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **preload_env(), **serve_env()}


def our_config(options: ServerOptions) -> dict:
    """cluster.yaml serving ``options.model_path`` as model "bench" with its shipped
    engine defaults (prompt cache included), ``options`` applied."""
    from mlx_serving.bench.serve import stable_config

    shipped = yaml.safe_load((REPO / "cluster.yaml").read_text())
    shipped_engine = shipped["applications"][0]["args"]["variants"]["stable"]["engine"]
    engine = {"prompt_cache_bytes": shipped_engine.get("prompt_cache_bytes", 0), **options.engine}
    config = stable_config(options.model_path, options.max_batch_size, {}, engine)
    deployment = config["applications"][0]["args"]["variants"]["stable"]["deployment"]
    if options.replicas != 1:
        deployment.pop("max_replicas_per_node", None)  # several replicas on one host
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = options.replicas
    if options.gpus_per_replica:
        deployment.setdefault("ray_actor_options", {})["num_gpus"] = options.gpus_per_replica
    args = config["applications"][0]["args"]
    # As many Routers as LLMServers, so that the ingress grows with the replicas it feeds.
    args["router"]["num_replicas"] = max(args["router"].get("num_replicas", 1), options.replicas)
    if options.max_concurrency:
        _hold_the_sweep(args, options.max_concurrency)
    deployment.update(options.deployment)
    return config


def _hold_the_sweep(args: dict, concurrency: int) -> None:
    """Size the stable variant's queues to hold ``concurrency`` requests, and turn the QoS
    monitor's latency actions into alerts: a closed-loop level above the batch size queues
    by design, and shedding it would measure the refusals instead of the throughput.

    Serve's queue at each Router counts the requests it is still routing, not only those
    waiting for room: a wave of streams coming back at once overfills a smaller one with
    503s while every replica has room (run 25)."""
    variant = args["variants"]["stable"]
    engine, deployment = variant["engine"], variant["deployment"]
    engine["max_waiting_requests"] = max(engine.get("max_waiting_requests", 0), concurrency)
    deployment["max_ongoing_requests"] = max(deployment.get("max_ongoing_requests", 0),
                                             concurrency)
    if deployment.get("max_queued_requests") != -1:  # -1: unbounded already
        deployment["max_queued_requests"] = max(deployment.get("max_queued_requests", 0),
                                                concurrency)
    args.setdefault("qos", {})["actions"] = {"ttft_p95": ["alert"], "itl_p95": ["alert"]}


@contextmanager
def serve_run(config: dict, port: int, log: Path, timeout_s: float) -> Iterator[str]:
    """``config`` under ``serve run`` (its own local Ray) with its output in ``log``;
    yields the URL once ``/ready`` answers, stops it (SIGTERM, then SIGKILL) after."""
    config["http_options"]["port"] = port
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    env = {**os.environ, "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1", **serve_env()}
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([*SERVE_CLI, "run", f.name], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_until(lambda: is_ready(url), timeout_s, gave_up=lambda: proc.poll() is not None):
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"serve run not ready (exit {proc.returncode}); "
                               f"the end of {log}:\n{tail}")
        yield url
    finally:
        _stop(proc, timeout_s=120)
        os.unlink(f.name)


def _stop(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM ``proc``, then SIGKILL its whole session if it has not exited in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@contextmanager
def start_ours(options: ServerOptions, port: int | None = None, attempts: int = 3,
               log_dir: Path | None = None) -> Iterator[Endpoint]:
    """Our application under ``serve run`` until the block ends; its output goes to
    ``log_dir/serve-run.log`` (a temporary folder by default). A start that fails (seen
    on a machine where other jobs start and stop Ray clusters meanwhile) is tried again,
    up to ``attempts`` times in all."""
    config = our_config(options)  # replicas get OpenBLAS through the app's runtime_env
    log = Path(log_dir or tempfile.mkdtemp(prefix="bench-serve-")) / "serve-run.log"
    with ExitStack() as stack:
        for attempt in range(1, attempts + 1):
            try:
                url = stack.enter_context(serve_run(config, port or free_port(), log,
                                                    options.startup_timeout_s))
                break
            except RuntimeError as exc:
                if attempt == attempts:
                    raise
                print(f"{exc}\nstarting again ({attempt}/{attempts})", file=sys.stderr)
        yield Endpoint(SERVER_NAMES["ours"], url, "bench",
                       command="serve run <cluster.yaml, stable variant: "
                               + json.dumps(config["applications"][0]["args"]["variants"]["stable"],
                                            sort_keys=True) + ">")


def mlx_lm_command(options: ServerOptions, port: int) -> list[str]:
    """The mlx_lm.server command line for ``options``."""
    cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(Path(options.model_path).resolve()),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
    if options.max_batch_size:
        cmd += ["--decode-concurrency", str(options.max_batch_size)]
    return cmd + list(options.mlx_lm_args)


@contextmanager
def start_mlx_lm(options: ServerOptions, port: int | None = None,
                 log_dir: Path | None = None) -> Iterator[Endpoint]:
    """mlx_lm.server in a child process until the block ends, its output in
    ``log_dir/mlx_lm-server.log`` (discarded without ``log_dir``); ready once its model
    answers a one-token completion."""
    port = port or free_port()
    cmd = mlx_lm_command(options, port)
    with open(Path(log_dir) / "mlx_lm-server.log" if log_dir else os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until(lambda: completes(url, "default_model"), options.startup_timeout_s,
                          gave_up=lambda: proc.poll() is not None, interval_s=0.5):
            raise RuntimeError(
                f"server exited with {proc.returncode} before it was ready"
                if proc.poll() is not None
                else f"server at {url} not ready after {options.startup_timeout_s:.0f} s")
        yield Endpoint(SERVER_NAMES["mlx_lm"], url, "default_model",
                       command=" ".join(["python"] + cmd[1:]))
    finally:
        _stop(proc, timeout_s=60)


STARTERS = {"ours": start_ours, "mlx_lm": start_mlx_lm}


def eos_logit_bias(model_path: str) -> dict[str, float]:
    """A ``logit_bias`` that keeps a model's EOS tokens from being sampled (-100 each, the
    OpenAI minimum), for servers without ``ignore_eos``; from ``config.json`` and
    ``generation_config.json``."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = Path(model_path) / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else eos or [])
    return {str(i): -100.0 for i in sorted(ids)}
