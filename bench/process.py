"""The engine in this process against the same engine in a child process (``EngineProcess``).

Both sides get the same workload from the load generator at each concurrency, in
alternating runs (``mlx_serving.bench.compare``), and the report gives medians of tokens/s,
latencies and the engine's own counters. ``--gil-load`` keeps a Python thread of this
process holding the GIL for that share of the time (pickling chunk-like objects), a stand-in for Ray Serve's per-chunk work in an LLMServer replica:
it slows an engine thread in this process, not one in the child.

    python -m mlx_serving.bench.process --model models/demo-small --concurrency 8 32 --gil-load 0.3
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import sys
import threading
import time
from dataclasses import asdict

from mlx_serving.bench.compare import drive, engine_counters, report
from mlx_serving.bench.engine import machine
from mlx_serving.bench.loadgen import EngineTarget, Workload
from mlx_serving.engine import Engine, EngineConfig, EngineProcess, ModelConfig
from mlx_serving.engine.blas import ensure_preloaded

SIDES = ("in-process", "child process")


def hold_gil(share: float, stop: threading.Event) -> None:
    """Hold the GIL for ``share`` of every millisecond until ``stop`` is set."""
    chunk = [{"text": "word", "num_tokens": 1, "finish_reason": None}] * 8
    while not stop.is_set():
        until = time.perf_counter() + share * 1e-3
        while time.perf_counter() < until:
            pickle.loads(pickle.dumps(chunk))
        time.sleep((1 - share) * 1e-3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8])
    p.add_argument("--requests", type=int, default=32, help="measured requests per run")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gil-load", type=float, default=0.0,
                   help="share of time a thread of this process holds the GIL (0-1)")
    args = p.parse_args(argv)
    config = EngineConfig(models=[ModelConfig(name="bench", path=args.model)],
                          max_batch_size=max(args.concurrency), prompt_cache_bytes=0)
    engines = {SIDES[0]: Engine(config), SIDES[1]: EngineProcess(config)}
    stop = threading.Event()
    if args.gil_load:
        threading.Thread(target=hold_gil, args=(args.gil_load, stop), daemon=True).start()
    levels = [(n, Workload(requests=args.requests, prompt_tokens=args.prompt_tokens,
                           max_tokens=args.max_tokens, warmup=n, seed=n))
              for n in args.concurrency]

    def target(engine: Engine | EngineProcess):
        async def probe() -> dict[str, float]:
            return engine_counters(asdict(engine.stats()))
        return EngineTarget(engine), probe

    try:
        runs = asyncio.run(drive({side: target(e) for side, e in engines.items()},
                                 levels, args.repeats))
        print(f"machine: {machine()}\nmodel: {args.model}; {args.prompt_tokens}-token prompts, "
              f"{args.max_tokens} new tokens, {args.requests} requests a run, median of "
              f"{args.repeats}; GIL load in this process: {args.gil_load:.0%}\n")
        print(report(runs, {side: side for side in SIDES}))
    finally:
        stop.set()
        for engine in engines.values():
            engine.shutdown()
    return 0


if __name__ == "__main__":
    ensure_preloaded()   # the BLAS that `make` and the Serve replicas use
    sys.exit(main())
