"""The serving path's cost: HTTP through Ray Serve against the engine in-process.

Same model, same engine settings (cluster.yaml's stable variant), same workload from the
load generator; only the path differs. The application from cluster.yaml runs under
``serve run`` while this process holds its own engine, and each load level is driven
along three paths, one after the other, ``--repeats`` times (in a rotating order, so
that drift of a shared or noisy machine falls on every path alike):

- ``engine``: the engine in this process (the ceiling);
- ``handle``: a Serve handle straight to the LLMServer deployment (one Ray hop: the
  replica's share of the cost, without proxy, Router or HTTP);
- ``http``: HTTP through Serve's proxy and the Router, as clients see it.

Each run also reads the serving engine's counters over its measured requests: steps per
second and tokens per step tell a slower step from an emptier batch, and prefill passes
and prefill time show how prompts were batched. The report gives medians over repeats.

    python -m mlx_serving.bench.serve --model models/demo-small --concurrency 1 8 32 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import AsyncIterator

import yaml

from mlx_serving.bench.compare import Runs, drive, engine_counters, report
from mlx_serving.bench.engine import machine
from mlx_serving.bench.loadgen import (EngineTarget, HttpTarget, RequestError, RequestSpec,
                                      Workload, generation_request)
from mlx_serving.bench.servers import serve_run
from mlx_serving.deployments.app import server_deployment_name, with_env
from mlx_serving.deployments.llm_server import LLMServer
from mlx_serving.deployments.router import Router
from mlx_serving.deployments.serve_env import describe, ensure_applied
from mlx_serving.engine import Engine, EngineConfig
from mlx_serving.engine.blas import ensure_preloaded

REPO = Path(__file__).resolve().parent.parent
PATH_NAMES = {"engine": "engine in-process", "handle": "Serve handle", "http": "HTTP via Router"}


def stable_config(model: str, max_batch_size: int | None, settings: dict,
                  engine: dict | None = None) -> dict:
    """cluster.yaml with one stable LLMServer replica serving ``model``; ``settings`` and
    ``engine`` override its LLMServer settings and engine settings."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    variant = config["applications"][0]["args"]["variants"]["stable"]
    variant["engine"]["models"] = [{"name": "bench", "path": str(Path(model).resolve())}]
    variant["engine"]["prompt_cache_bytes"] = 0  # distinct prompts; keep both sides equal
    variant["settings"].update(settings)
    variant["engine"].update(engine or {})
    if max_batch_size:
        variant["engine"]["max_batch_size"] = max_batch_size
        variant["deployment"]["max_ongoing_requests"] = 2 * max_batch_size
    return config


class HandleTarget:
    """The LLMServer deployment called through a Serve ``DeploymentHandle``."""

    def __init__(self, handle, model: str):
        self._handle = handle.options(stream=True)
        self.model = model

    async def stream(self, spec: RequestSpec) -> AsyncIterator[int]:
        async for chunk in self._handle.generate.remote(generation_request(spec, self.model)):
            if chunk.error:
                raise RequestError(f"engine_{chunk.error_code or 'error'}", chunk.error)
            if chunk.num_tokens:
                yield chunk.num_tokens


def run(config: dict, levels: list[tuple[int, Workload]], repeats: int, port: int) -> Runs:
    """Every level along every path, ``repeats`` times."""
    import ray
    from ray import serve

    variant = config["applications"][0]["args"]["variants"]["stable"]
    engine = Engine(EngineConfig.model_validate(variant["engine"]))
    try:
        with tempfile.TemporaryDirectory() as tmp, \
                serve_run(config, port, Path(tmp) / "serve-run.log", 600) as url:
            ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
            try:
                server = serve.get_deployment_handle(server_deployment_name("stable"),
                                                     config["applications"][0]["name"])

                async def local_counters() -> dict[str, float]:
                    return engine_counters(asdict(engine.stats()))

                async def replica_counters() -> dict[str, float]:
                    return engine_counters(await server.stats.remote())

                async def go() -> Runs:
                    http = HttpTarget(url, "bench", max_connections=max(n for n, _ in levels) + 8)
                    try:
                        return await drive({"engine": (EngineTarget(engine), local_counters),
                                            "handle": (HandleTarget(server, "bench"), replica_counters),
                                            "http": (http, replica_counters)}, levels, repeats)
                    finally:
                        await http.aclose()

                return asyncio.run(go())
            finally:
                ray.shutdown()
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests-per-stream", type=int, default=4,
                   help="measured requests = concurrency x this (at least 16)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each path at each level")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-tokens-spread", type=float, default=0.0,
                   help="each request asks for max_tokens x [1-s, 1+s] tokens (seeded, the same "
                        "on every path), so that sequences do not all end on the same step")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--port", type=int, default=8077)
    p.add_argument("--chunk-interval-ms", type=float, help="override the LLMServer setting")
    p.add_argument("--max-chunks-per-s", type=float, help="override the LLMServer setting")
    p.add_argument("--switch-interval-ms", type=float,
                   help="override the LLMServer setting (the replica's GIL switch interval)")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine setting for every path, e.g. prefill_batch_size=16 (YAML value)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="the replica runs its engine in a child process (engine_process: true), "
                        "or not; default: the application's (a child process on a GPU)")
    p.add_argument("--replica-niceness", type=int,
                   help="the LLMServer's and Routers' niceness (RAY_worker_niceness in their "
                        "runtime_env); default: the application's (0; Ray's own default is 15)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    engine_settings = {}
    for item in args.engine:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--engine takes KEY=VALUE, got {item!r}")
        engine_settings[key] = yaml.safe_load(value)
    settings = {k: v for k, v in (("chunk_interval_ms", args.chunk_interval_ms),
                                  ("max_chunks_per_s", args.max_chunks_per_s),
                                  ("switch_interval_ms", args.switch_interval_ms))
                if v is not None}
    config = stable_config(args.model, args.max_batch_size, settings, engine_settings)
    if args.replica_niceness is not None:
        app_args = config["applications"][0]["args"]
        for options, default in ((app_args["variants"]["stable"]["deployment"],
                                  LLMServer.ray_actor_options),
                                 (app_args["router"], Router.ray_actor_options)):
            options["ray_actor_options"] = with_env(
                options.get("ray_actor_options", default),
                {"RAY_worker_niceness": str(args.replica_niceness)})
    if args.engine_process is not None:
        config["applications"][0]["args"]["variants"]["stable"]["engine_process"] = (
            args.engine_process)
    levels = [(n, Workload(requests=max(16, n * args.requests_per_stream),
                           prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                           warmup=min(n, 8), seed=n, max_tokens_spread=args.max_tokens_spread))
              for n in args.concurrency]  # identical workloads on every path
    runs = run(config, levels, args.repeats, args.port)
    print(f"machine: {machine()}\nmodel: {args.model}\nserve: {describe()}\n\n"
          f"{report(runs, PATH_NAMES)}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine(), "args": vars(args), "serve_mode": describe(),
             "levels": [{"concurrency": n, **{path: [r.to_dict() for r in results]
                                              for path, results in by_path.items()}}
                        for n, by_path in runs.items()]},
            indent=2))
    return 0


if __name__ == "__main__":
    ensure_applied()     # the handle path talks to the replica as the Routers do
    ensure_preloaded()   # the BLAS that `make` and the Serve replicas use
    sys.exit(main())
