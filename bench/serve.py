"""The serving path's cost: HTTP through Ray Serve against the engine in-process.

Same model, same engine settings (cluster.yaml's stable variant), same workload from the
load generator; only the path differs. The engine runs in this process first, then the
application from cluster.yaml is started with ``serve run`` and loaded over HTTP.

    python -m mlx_serving.bench.serve --model models/demo-small --concurrency 1 8 32 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from mlx_serving.bench.engine import machine
from mlx_serving.bench.loadgen import EngineTarget, HttpTarget, LoadResult, Workload, run_load
from mlx_serving.engine import Engine, EngineConfig

REPO = Path(__file__).resolve().parent.parent


def stable_config(model: str, max_batch_size: int | None, settings: dict) -> dict:
    """cluster.yaml with one stable LLMServer replica serving ``model``."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    variant = config["applications"][0]["args"]["variants"]["stable"]
    variant["engine"]["models"] = [{"name": "bench", "path": str(Path(model).resolve())}]
    variant["engine"]["prompt_cache_bytes"] = 0  # distinct prompts; keep both sides equal
    variant["settings"].update(settings)
    if max_batch_size:
        variant["engine"]["max_batch_size"] = max_batch_size
        variant["deployment"]["max_ongoing_requests"] = 2 * max_batch_size
    return config


Levels = list[tuple[int, Workload]]  # (concurrency, its workload)


async def _run_levels(target, levels: Levels) -> list[LoadResult]:
    return [await run_load(target, workload, n) for n, workload in levels]


def run_engine(config: dict, levels: Levels) -> list[LoadResult]:
    engine_cfg = config["applications"][0]["args"]["variants"]["stable"]["engine"]
    engine = Engine(EngineConfig.model_validate(engine_cfg))
    try:
        return asyncio.run(_run_levels(EngineTarget(engine), levels))
    finally:
        engine.shutdown()


def run_serve(config: dict, levels: Levels, port: int) -> list[LoadResult]:
    config["http_options"]["port"] = port
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    env = {**os.environ, "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1"}
    # The `serve` CLI through this interpreter (works where its script is not on PATH).
    cli = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    serve = subprocess.Popen([*cli, "run", f.name],
                             env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError("serve run did not become ready")
            time.sleep(1)

        async def go():
            target = HttpTarget(url, "bench", max_connections=max(n for n, _ in levels) + 8)
            try:
                return await _run_levels(target, levels)
            finally:
                await target.aclose()

        return asyncio.run(go())
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=120)
        os.unlink(f.name)


def report(engine: list[LoadResult], served: list[LoadResult]) -> str:
    lines = ["| concurrent | engine tok/s | Serve HTTP tok/s | HTTP ÷ engine | TTFT p50 engine / HTTP (ms) | ITL p50 engine / HTTP (ms) |",
             "|---|---|---|---|---|---|"]
    for e, s in zip(engine, served):
        ratio = s.output_tok_s / e.output_tok_s if e.output_tok_s else float("nan")
        lines.append(f"| {e.concurrency} | {e.output_tok_s:,.1f} | {s.output_tok_s:,.1f} | {ratio:.3f} "
                     f"| {e.ttft_ms['p50']:.0f} / {s.ttft_ms['p50']:.0f} "
                     f"| {e.itl_ms['p50']:.1f} / {s.itl_ms['p50']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests-per-stream", type=int, default=4,
                   help="measured requests = concurrency x this (at least 16)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--port", type=int, default=8077)
    p.add_argument("--chunk-interval-ms", type=float, help="override the LLMServer setting")
    p.add_argument("--max-chunks-per-s", type=float, help="override the LLMServer setting")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    settings = {k: v for k, v in (("chunk_interval_ms", args.chunk_interval_ms),
                                  ("max_chunks_per_s", args.max_chunks_per_s)) if v is not None}
    config = stable_config(args.model, args.max_batch_size, settings)
    levels = [(n, Workload(requests=max(16, n * args.requests_per_stream),
                           prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                           warmup=min(n, 8), seed=n))
              for n in args.concurrency]  # identical workloads for both paths
    engine = run_engine(config, levels)
    served = run_serve(config, levels, args.port)
    table = report(engine, served)
    print(f"machine: {machine()}\nmodel: {args.model}\n\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine(), "args": vars(args),
             "engine": [r.to_dict() for r in engine], "serve": [r.to_dict() for r in served]},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
