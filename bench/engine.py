"""The engine against raw mlx-lm ``BatchGenerator`` on the same model and load.

Both sides get the same prompts (random token ids of a fixed length) and generate a fixed
number of tokens (EOS ignored), N sequences at once; the raw side drives BatchGenerator
in a plain loop, the engine side goes through ``Engine.generate`` (scheduler thread,
detokenization, stop-string matching, streams, asyncio). Runs alternate so drift hits
both sides alike; the report gives medians and the engine/raw ratio.

    python -m mlx_serving.bench.engine --model models/demo-small --concurrency 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from mlx_serving.engine import fd_limits  # noqa: F401  isort: skip  (before mlx-lm)
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, generate_step

from mlx_serving.engine import Engine, EngineConfig, GenerationRequest, ModelConfig, SamplingParams
from mlx_serving.engine.blas import ensure_preloaded


@dataclass
class Result:
    concurrency: int
    raw_tok_s: float
    engine_tok_s: float
    raw_runs: list[float]
    engine_runs: list[float]
    # mlx-lm's single-sequence ``generate_step`` (one stream only): faster than a batch of one
    generate_step_runs: list[float] | None = None

    @property
    def ratio(self) -> float:
        return self.engine_tok_s / self.raw_tok_s


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


def run_raw(model, prompts: list[list[int]], max_tokens: int, batch_size: int) -> float:
    """Output tokens per second of BatchGenerator generating for all prompts at once."""
    gen = BatchGenerator(model, completion_batch_size=batch_size,
                         prefill_batch_size=min(batch_size, 8))
    start = time.perf_counter()
    uids = set(gen.insert(prompts, max_tokens=[max_tokens] * len(prompts)))
    tokens = 0
    while uids:
        for r in gen.next_generated():
            tokens += 1
            if r.finish_reason is not None:
                uids.discard(r.uid)
    elapsed = time.perf_counter() - start
    gen.close()
    return tokens / elapsed


def run_generate_step(model, prompt: list[int], max_tokens: int) -> float:
    """Output tokens per second of mlx-lm's ``generate_step`` for one sequence."""
    start = time.perf_counter()
    tokens = sum(1 for _ in zip(range(max_tokens), generate_step(mx.array(prompt), model)))
    return tokens / (time.perf_counter() - start)


def run_engine(engine: Engine, prompts: list[list[int]], max_tokens: int) -> float:
    """Output tokens per second of the engine serving all prompts as concurrent requests."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one(prompt):
        n = 0
        async for delta in engine.generate(GenerationRequest(prompt=prompt, params=params)):
            n += len(delta.token_ids)
        return n

    async def all_of_them():
        return sum(await asyncio.gather(*(one(p) for p in prompts)))

    start = time.perf_counter()
    tokens = asyncio.run(all_of_them())
    return tokens / (time.perf_counter() - start)


def bench(model_path: str, concurrencies: list[int], prompt_tokens: int, max_tokens: int,
          repeats: int) -> list[Result]:
    batch_size = max(concurrencies)
    model, tokenizer = load(model_path)
    engine = Engine(EngineConfig(
        models=[ModelConfig(name="bench", path=model_path)], max_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 8), prompt_cache_bytes=0))
    vocab = engine.list_models()[0].vocab_size
    results = []
    try:
        # Warm both paths once at the largest size.
        warm = make_prompts(batch_size, prompt_tokens, vocab, seed=99)
        run_raw(model, warm, 8, batch_size)
        run_engine(engine, warm, 8)
        for n in concurrencies:
            raw, eng, single = [], [], []
            # An untimed pass of each side at this batch size first: MLX compiles kernels
            # per shape on first use, and that must not land on whichever side runs first.
            level_warm = make_prompts(n, prompt_tokens, vocab, seed=1000 + n)
            run_raw(model, level_warm, 8, batch_size)
            run_engine(engine, level_warm, 8)
            for r in range(repeats):
                prompts = make_prompts(n, prompt_tokens, vocab, seed=r)
                raw.append(run_raw(model, prompts, max_tokens, batch_size))
                eng.append(run_engine(engine, prompts, max_tokens))
                if n == 1:
                    single.append(run_generate_step(model, prompts[0], max_tokens))
            results.append(Result(n, statistics.median(raw), statistics.median(eng), raw, eng,
                                  single or None))
            print(f"concurrency {n:>3}: raw {results[-1].raw_tok_s:9.1f} tok/s   engine "
                  f"{results[-1].engine_tok_s:9.1f} tok/s   ratio {results[-1].ratio:.3f}",
                  file=sys.stderr)
    finally:
        engine.shutdown()
    return results


def machine() -> str:
    device = mx.default_device()
    info = mx.device_info()
    return f"{platform.node()} {platform.machine()} {info.get('device_name', '')} mlx {mx.__version__} ({device})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="set sys.setswitchinterval (GIL hand-off) for the run")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    results = bench(args.model, args.concurrency, args.prompt_tokens, args.max_tokens, args.repeats)
    print(f"\nmachine: {machine()}\nmodel: {args.model}; {args.prompt_tokens}-token prompts, "
          f"{args.max_tokens} new tokens, median of {args.repeats}\n")
    print("| concurrent | raw BatchGenerator tok/s (min–max) | engine tok/s (min–max) | engine ÷ raw |")
    print("|---|---|---|---|")
    for r in results:
        if r.generate_step_runs:
            runs = r.generate_step_runs
            print(f"| 1 (raw generate_step) | {statistics.median(runs):,.0f} "
                  f"({min(runs):,.0f}–{max(runs):,.0f}) | | |")
        print(f"| {r.concurrency} | {r.raw_tok_s:,.0f} ({min(r.raw_runs):,.0f}–{max(r.raw_runs):,.0f}) "
              f"| {r.engine_tok_s:,.0f} ({min(r.engine_runs):,.0f}–{max(r.engine_runs):,.0f}) "
              f"| {r.ratio:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "model": args.model, "args": vars(args),
                       "results": [asdict(r) | {"ratio": r.ratio} for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    ensure_preloaded()   # the BLAS that `make` and the Serve replicas use
    sys.exit(main())
