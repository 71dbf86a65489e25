"""The ``mlx-serving`` command line.

Subcommands import what they need lazily, so ``mlx-serving --help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


def _make_model(args: argparse.Namespace) -> int:
    from mlx_serving.engine.modelgen import make_model

    try:
        path = make_model(args.path, arch=args.arch, size=args.size, dtype=args.dtype,
                          quantize=args.quantize, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(f"error: {exc} (use --overwrite to replace a generated model)", file=sys.stderr)
        return 1
    print(f"wrote {args.size} {args.arch} model to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from mlx_serving.engine import (Engine, EngineConfig, EngineError, GenerationRequest,
                                    ModelConfig, SamplingParams)

    engine = Engine(EngineConfig(models=[ModelConfig(name="model", path=args.model)]))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    if args.raw:
        request = GenerationRequest(prompt=args.prompt, params=params)
    else:
        request = GenerationRequest(messages=[{"role": "user", "content": args.prompt}],
                                    params=params)

    async def stream() -> int:
        async for delta in engine.generate(request):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            if delta.finished:
                t, u = delta.timings, delta.usage
                rate = u.completion_tokens / t.decode_s if t.decode_s else 0.0
                print(f"\n[{delta.finish_reason.value}] {u.prompt_tokens} prompt + "
                      f"{u.completion_tokens} completion tokens, TTFT {t.ttft_s * 1e3:.0f} ms, "
                      f"{rate:.1f} tok/s", file=sys.stderr)
                return 1 if delta.error else 0
        return 0

    try:
        return asyncio.run(stream())
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-serving",
                                     description="mlx-serving: LLM serving on MLX and Ray Serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    mm = sub.add_parser("make-model", help="write a random-weight MLX model folder")
    mm.add_argument("path")
    mm.add_argument("--arch", choices=["llama", "qwen2", "qwen3"], default="llama")
    mm.add_argument("--size", choices=["tiny", "small", "1b", "8b"], default="tiny")
    mm.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    mm.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    mm.set_defaults(func=_make_model)

    gen = sub.add_parser("generate", help="stream one completion from the engine to the terminal")
    gen.add_argument("model", help="local MLX model folder or Hugging Face repo id")
    gen.add_argument("--prompt", default="Write a haiku about batching.")
    gen.add_argument("--raw", action="store_true", help="send the prompt without the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate)

    from mlx_serving.deployments.canary_cli import add_parsers
    add_parsers(sub)
    from mlx_serving.bench.llm_args import add_parsers as add_bench_parsers
    add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
