"""Replica scaling on a Ray cluster simulated on one machine: 1, 2, 3 ... LLMServer replicas,
one per node, with the Router in front; how evenly requests spread and what each replica
delivers.

For each replica count N this starts a fresh local cluster (``ray.cluster_utils.Cluster``):
a head node for the Router, proxy, Telemetry and RolloutController, and N nodes that each
offer ``--cpus-per-node`` CPUs and the custom resource ``{"mac": 1}``, as machines of a rack
would. cluster.yaml's application serves the model with N stable replicas that each need
``{"mac": 1}`` (so one lands on each node) and three quarters of ``--cpus-per-node``. The load is
``--streams-per-replica`` x N closed-loop streaming clients over HTTP (the fixed workload
of ``mlx-serving bench llm``). Each replica's share comes from the application's
``/metrics`` (``mlx_serving:engine_generation_tokens`` by replica, before and after).

The nodes share the machine's cores, memory bandwidth and caches: this shows the Router's
spread and the serving stack's overhead per replica, not the scaling of separate machines
(the multi-GPU run measures that).

    python -m mlx_serving.bench.replicas --model models/demo-small --replicas 1 2 3 \\
        --cpus-per-node 4 --streams-per-replica 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from mlx_serving.bench.loadgen import HttpTarget, LoadResult, Workload, run_load
from mlx_serving.bench.report import describe_environment, environment
from mlx_serving.bench.servers import (ServerOptions, deploy, free_port, our_config,
                                      server_env, wait_ready)

MODEL = "bench"  # the name our_config serves the model under
_SAMPLE = re.compile(r'^(?P<name>[\w:]+)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$')
_REPLICA = re.compile(r'replica="([^"]*)"')


@dataclass
class ScalingRun:
    """One replica count's figures."""

    replicas: int
    streams: int
    load: LoadResult
    tokens_by_replica: dict[str, float]  # tokens each replica generated in the measured run

    @property
    def shares(self) -> list[float]:
        """Each replica's share of the tokens, largest first."""
        total = sum(self.tokens_by_replica.values()) or 1.0
        return sorted((t / total for t in self.tokens_by_replica.values()), reverse=True)

    def to_dict(self) -> dict:
        return {"replicas": self.replicas, "streams": self.streams, "load": self.load.to_dict(),
                "tokens_by_replica": self.tokens_by_replica, "shares": self.shares}


@contextmanager
def simulated_cluster(nodes: int, cpus_per_node: int, head_cpus: int) -> Iterator:
    """A local Ray cluster (``ray.cluster_utils.Cluster``) of a head and ``nodes`` nodes
    with ``{"mac": 1}``. The nodes inherit this process's environment (offline hub,
    OpenBLAS)."""
    from ray.cluster_utils import Cluster

    saved = dict(os.environ)
    os.environ.update(server_env())
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node, resources={"mac": 1})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield cluster
    finally:
        cluster.shutdown()


def scaling_config(model: str, replicas: int, cpus_per_node: int,
                   max_batch_size: int | None, port: int) -> dict:
    """cluster.yaml serving ``model`` from ``replicas`` stable replicas, one per node."""
    config = our_config(ServerOptions(model_path=model, max_batch_size=max_batch_size))
    config["http_options"]["port"] = port
    deployment = config["applications"][0]["args"]["variants"]["stable"]["deployment"]
    deployment.pop("autoscaling_config", None)
    # Three quarters of the node: Serve may place a Router or Telemetry replica on any node,
    # and a replica that asked for the whole node would then never be scheduled.
    deployment.update(num_replicas=replicas, max_replicas_per_node=1,
                      ray_actor_options={"num_cpus": 0.75 * cpus_per_node,
                                         "resources": {"mac": 1}})
    return config


def deploy_and_wait(config: dict, cluster, timeout_s: float = 600.0) -> str:
    """``config`` deployed on ``cluster``; its URL once ``/ready`` answers (the cluster's
    shutdown takes the application down)."""
    url = deploy(config, cluster.address)
    if not wait_ready(url, timeout_s):
        raise RuntimeError(f"the application was not ready after {timeout_s:.0f} s; "
                           f"Serve's logs: {cluster.head_node.get_logs_dir_path()}/serve")
    return url


TOKENS = "mlx_serving:engine_generation_tokens_total"
STEPS = "mlx_serving:engine_steps_total"
FINISHED = "mlx_serving:requests_finished_total"
QUEUED = "mlx_serving:request_queue_seconds_total"
ENGINE_TTFT = "mlx_serving:request_engine_ttft_seconds_total"
TO_DECODE = "mlx_serving:request_to_decode_seconds_total"
TO_DECODE_STEPS = "mlx_serving:request_to_decode_steps_total"
TO_TOKEN_STEPS = "mlx_serving:request_to_token_steps_total"
# summed residence of finished requests: Serve's view (the replica's streams) and the engine's
IN_REPLICA = "mlx_serving:request_replica_seconds_total"
IN_ENGINE = "mlx_serving:request_engine_seconds_total"
ROUTER_TTFT_SUM = "mlx_serving:time_to_first_token_seconds_sum"       # from the Router's arrival
ROUTER_TTFT_COUNT = "mlx_serving:time_to_first_token_seconds_count"
ENGINE_SECONDS = "mlx_serving:engine_thread_seconds_total"
THREAD_CPU = "mlx_serving:engine_thread_cpu_seconds_total"
PROCESS_CPU = "mlx_serving:engine_process_cpu_seconds_total"
# not "idle": it is the rest of the wall time
ENGINE_ACTIVITIES = ("prefill", "decode", "join", "admit", "release", "tokens")


def engine_seconds(activity: str) -> str:
    """The name under which ``counters_by_replica`` reads the engine thread's seconds in
    ``activity``."""
    return f'{ENGINE_SECONDS}{{activity="{activity}"}}'


# what bench llm reads from our application around each level
PROBED = (TOKENS, STEPS, FINISHED, QUEUED, ENGINE_TTFT, TO_DECODE, TO_DECODE_STEPS,
          TO_TOKEN_STEPS, IN_REPLICA, IN_ENGINE, ROUTER_TTFT_SUM, ROUTER_TTFT_COUNT,
          THREAD_CPU, PROCESS_CPU, *map(engine_seconds, ENGINE_ACTIVITIES))


def counters_by_replica(url: str, names: tuple[str, ...] = (TOKENS,)) -> dict[str, float]:
    """The counters ``names`` of each LLMServer replica, from the application's /metrics,
    keyed ``name@replica``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {f"{name}@{replica}": value for name in names
            for replica, value in parse_by_replica(text, name).items()}


def of_metric(counters: dict[str, float], name: str) -> dict[str, float]:
    """The replica -> value part of ``counters_by_replica``'s answer for the metric ``name``."""
    prefix = f"{name}@"
    return {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix)}


def parse_by_replica(metrics: str, name: str) -> dict[str, float]:
    """The samples of the metric ``name`` summed by replica label. ``name`` may name one
    label too, ``metric{label="value"}``, to keep only the samples that carry it."""
    base, _, label = name.partition("{")
    label = label.rstrip("}")
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        m = _SAMPLE.match(line)
        if m and m["name"] == base and (not label or label in m["labels"].split(",")):
            replica = _REPLICA.search(m["labels"])
            if replica:
                out[replica[1]] = out.get(replica[1], 0.0) + float(m["value"])
    return out


async def settled_counters_by_replica(url: str, previous: dict[str, float] | None = None,
                                      names: tuple[str, ...] = (TOKENS,),
                                      wait_s: float = 3.0) -> dict[str, float]:
    """``counters_by_replica`` once the work counted by ``TOKENS`` and ``STEPS`` (where
    asked for) stops moving (Telemetry gets them each second). Other counters may keep
    moving a little while the engine idles, e.g. the engine thread's seconds."""
    def work(counters: dict[str, float] | None) -> dict[str, float] | None:
        return None if counters is None else {
            k: v for k, v in counters.items() if k.partition("@")[0] in (TOKENS, STEPS)}

    await asyncio.sleep(wait_s)
    current = await asyncio.to_thread(counters_by_replica, url, names)
    while work(current) != work(previous):
        previous = current
        await asyncio.sleep(wait_s)
        current = await asyncio.to_thread(counters_by_replica, url, names)
    return current


async def measure(url: str, replicas: int, streams: int, workload: Workload) -> ScalingRun:
    async with HttpTarget(url, MODEL, max_connections=streams + 8) as http:
        await run_load(http, Workload(requests=streams, warmup=0, seed=99, max_tokens=8), streams)
        before = await settled_counters_by_replica(url)
        load = await run_load(http, workload, streams)
        after = await settled_counters_by_replica(url, before)
    start = of_metric(before, TOKENS)
    delta = {r: n - start.get(r, 0.0) for r, n in of_metric(after, TOKENS).items()}
    return ScalingRun(replicas, streams, load, delta)


def report(runs: list[ScalingRun]) -> str:
    base = runs[0].load.output_tok_s / runs[0].replicas if runs else 0.0
    lines = ["| replicas | streams | output tok/s | per replica | scaling efficiency | "
             "token share per replica | TTFT p50 / p99 ms | ok / failed |",
             "|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in runs:
        per = r.load.output_tok_s / r.replicas
        lines.append(
            f"| {r.replicas} | {r.streams} | {r.load.output_tok_s:,.1f} | {per:,.1f} | "
            f"{per / base:.2f} | {' / '.join(f'{s:.0%}' for s in r.shares)} | "
            f"{r.load.ttft_ms['p50']:,.0f} / {r.load.ttft_ms['p99']:,.0f} | "
            f"{r.load.requests_ok} / {r.load.requests_failed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MLX model folder")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--cpus-per-node", type=int, default=4)
    p.add_argument("--head-cpus", type=int, default=2)
    p.add_argument("--streams-per-replica", type=int, default=8)
    p.add_argument("--requests-per-stream", type=int, default=4)
    p.add_argument("--input-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, help="each replica's engine batch")
    p.add_argument("--ready-timeout-s", type=float, default=600.0,
                   help="how long each deployment may take to answer /ready")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    runs = []
    for n in args.replicas:
        streams = n * args.streams_per_replica
        workload = Workload(requests=streams * args.requests_per_stream,
                            prompt_tokens=args.input_tokens, max_tokens=args.output_tokens,
                            warmup=streams, warmup_max_tokens=16, seed=n)
        config = scaling_config(str(Path(args.model).resolve()), n, args.cpus_per_node,
                                args.max_batch_size, free_port())
        with simulated_cluster(n, args.cpus_per_node, args.head_cpus) as cluster:
            url = deploy_and_wait(config, cluster, args.ready_timeout_s)
            run = asyncio.run(measure(url, n, streams, workload))
        runs.append(run)
        print(f"{n} replica(s): {run.load.output_tok_s:,.1f} tok/s, shares "
              f"{[f'{s:.0%}' for s in run.shares]}", file=sys.stderr, flush=True)
        if args.json:  # after each count, so an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps(
                {"environment": environment(), "args": vars(args),
                 "runs": [r.to_dict() for r in runs]}, indent=2))
    print(f"{describe_environment(environment())}\nmodel: {args.model}\n\n{report(runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
