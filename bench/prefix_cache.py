"""The engine's prefix (prompt) cache on and off, in-process, on chat traffic.

Chat prompts share their template's first tokens even when their contents differ, so
every request finds a short cached prefix; with ``--system-words`` they also share a
system prompt, a long one. Each run is a closed loop of N streams (fixed prompt and
output lengths, greedy, EOS ignored) against a fresh engine, cache off and on in turn, so
drift hits both alike. The report gives throughput, TTFT and ITL, the engine thread's
seconds by activity (``admit`` is the cache lookups, ``release`` the stores) and the hits.

    python -m mlx_serving.bench.prefix_cache --model models/demo-small --system-words 0 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from mlx_serving.bench.loadgen import EngineTarget, RequestSpec, Workload, random_text, run_load
from mlx_serving.bench.report import describe_environment, environment
from mlx_serving.engine import Engine, EngineConfig, ModelConfig

_ACTIVITIES = ("prefill_s", "decode_s", "join_s", "admit_s", "release_s", "tokens_s")


@dataclass(frozen=True)
class SystemPromptWorkload(Workload):
    """``Workload`` whose chats all open with one system prompt of ``system_words`` words."""

    system_words: int = 0

    def specs(self) -> tuple[list[RequestSpec], list[RequestSpec]]:
        warmup, measured = super().specs()
        if not self.system_words:
            return warmup, measured
        system = (("system", random_text(random.Random(123), self.system_words)),)
        return ([replace(s, history=system) for s in warmup],
                [replace(s, history=system) for s in measured])


async def run_once(model: str, cache_bytes: int, system_words: int, args) -> dict:
    """One closed-loop run against a fresh engine; its figures as a dict."""
    engine = Engine(EngineConfig(
        models=[ModelConfig(name="bench", path=model)], max_batch_size=args.max_batch_size,
        prefill_batch_size=args.prefill_batch_size, prompt_cache_bytes=cache_bytes))
    try:
        target, n = EngineTarget(engine, "bench"), args.concurrency
        await run_load(target, SystemPromptWorkload(requests=n, warmup=0, seed=5, max_tokens=16,
                                                    system_words=system_words), n)
        before = engine.stats()
        load = await run_load(target, SystemPromptWorkload(
            requests=n * args.requests_per_stream, warmup=0, seed=7,
            prompt_tokens=args.input_tokens, max_tokens=args.output_tokens,
            system_words=system_words), n)
        after = engine.stats()
    finally:
        engine.shutdown()
    return {"cache": "on" if cache_bytes else "off", "system_words": system_words,
            "output_tok_s": load.output_tok_s, "ttft_p50_ms": load.ttft_ms["p50"],
            "itl_p50_ms": load.itl_ms["p50"],
            **{k: getattr(after, k) - getattr(before, k) for k in _ACTIVITIES},
            "hits": after.prefix_cache_hits - before.prefix_cache_hits,
            "failed": load.requests_failed}


def report(runs: list[dict]) -> str:
    lines = ["| system prompt words | prompt cache | tok/s | TTFT p50 ms | ITL p50 ms | engine s: "
             "prefill / decode / join / admit / release / tokens | hits |",
             "|---:|---|---:|---:|---:|---|---:|"]
    for r in runs:
        seconds = " / ".join(f"{r[k]:.2f}" for k in _ACTIVITIES)
        lines.append(f"| {r['system_words']} | {r['cache']} | {r['output_tok_s']:,.0f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['itl_p50_ms']:.1f} | {seconds} | {r['hits']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MLX model folder")
    p.add_argument("--system-words", type=int, nargs="+", default=[0, 200])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests-per-stream", type=int, default=4)
    p.add_argument("--input-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--prefill-batch-size", type=int, default=16)
    p.add_argument("--cache-bytes", type=int, default=512 * 2**20, help="the cache when on")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="write the runs here")
    args = p.parse_args(argv)

    runs = []
    for words in args.system_words:
        for _ in range(args.repeats):
            for cache_bytes in (0, args.cache_bytes):
                runs.append(asyncio.run(run_once(args.model, cache_bytes, words, args)))
                print(report(runs[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": environment(), "args": vars(args), "runs": runs}, indent=2))
    print(f"{describe_environment(environment())}\nmodel: {args.model}\n\n{report(runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
