"""The arguments of ``mlx-serving bench llm`` (argparse only: cheap to import, so
``mlx-serving --help`` stays fast; ``mlx_serving.bench.llm`` does the work)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Benchmark OpenAI-compatible LLM servers the way vllm bench serve, llmperf and GuideLLM do:
a sweep of streaming clients at fixed concurrency (or fixed request rate), fixed output
lengths (EOS ignored), warm-up excluded. Reports output tok/s, requests/s, TTFT p50/p90/p99,
inter-token latency p50/p99, end-to-end latency and errors; writes JSON, a markdown report
and PNG plots. --compare starts ours (serve run) and mlx_lm.server on the same model and
sweeps each in turn."""

EPILOG = """\
examples:
  mlx-serving bench llm --url http://127.0.0.1:8000 --model demo --concurrency 1 8 32
  mlx-serving bench llm --compare --model-path models/demo-small --concurrency 1 8 32
  mlx-serving bench llm --compare --model-size 1b --model-dtype bfloat16 \\
      --concurrency 1 8 32 64 128 --max-batch-size 128          # on a GPU machine
  mlx-serving bench llm --compare --workload sharegpt --rate 1 2 4 --concurrency 64"""


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
    return key, value


def _positive(item: str) -> int:
    value = int(item)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {item!r}")
    return value


def _endpoint(item: str) -> tuple[str, str, str]:
    parts = item.split("=")
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected LABEL=URL=MODEL, got {item!r}")
    return parts[0], parts[1], parts[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``bench llm``."""
    p.description, p.epilog = DESCRIPTION, EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter

    t = p.add_argument_group("what to load")
    t.add_argument("--url", help="base URL of a running OpenAI-compatible server")
    t.add_argument("--model", help="model name to ask --url for")
    t.add_argument("--label", help="name of --url in tables and plots (default: the URL)")
    t.add_argument("--api-key", help="bearer token for --url and --endpoint")
    t.add_argument("--endpoint", type=_endpoint, action="append", default=[],
                   metavar="LABEL=URL=MODEL", help="another running server (repeatable)")
    t.add_argument("--compare", action="store_true",
                   help="start each of --servers on the same model, sweep each in turn")
    t.add_argument("--servers", nargs="+", choices=["ours", "mlx_lm"], default=["ours", "mlx_lm"],
                   help="servers --compare starts (default: both)")
    t.add_argument("--baseline", help="server the ratio column divides by "
                                      "(default: mlx_lm.server when present, else the first)")

    m = p.add_argument_group("model and servers (--compare)")
    m.add_argument("--model-path", help="MLX model folder (default: models/demo-small, made if missing)")
    m.add_argument("--model-size", choices=["tiny", "small", "1b", "8b"],
                   help="generate a random-weight llama of this size under --models-dir instead")
    m.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32")
    m.add_argument("--models-dir", default="models")
    m.add_argument("--max-batch-size", type=int,
                   help="both servers' decode batch: our max_batch_size, mlx_lm's "
                        "--decode-concurrency (default: theirs, 32)")
    m.add_argument("--replicas", type=int, default=1, help="our LLMServer replicas")
    m.add_argument("--gpus-per-replica", type=float, help="num_gpus of each of our replicas")
    m.add_argument("--engine", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="one of our engine settings (YAML value), e.g. prefill_batch_size=16")
    m.add_argument("--deployment", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="Serve deployment option of our LLMServer replicas, applied last "
                        "(e.g. max_ongoing_requests=132; values are YAML); repeatable")
    m.add_argument("--mlx-lm-arg", action="append", default=[], metavar="ARG",
                   help="extra mlx_lm.server argument, e.g. --mlx-lm-arg=--prompt-concurrency=16")
    m.add_argument("--eos-logit-bias", nargs="+", default=[], metavar="SERVER",
                   help="servers (labels, or ours/mlx_lm) that get a logit_bias of -100 on the "
                        "model's EOS ids, for servers without ignore_eos (needs the model path)")

    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=["fixed", "sharegpt", "shared-prefix"], default="fixed")
    w.add_argument("--input-tokens", type=int, default=128,
                   help="fixed: prompt words (~tokens); shared-prefix: words per user turn")
    w.add_argument("--output-tokens", type=int, default=128, help="fixed, shared-prefix: tokens asked")
    w.add_argument("--length-scale", type=float, default=1.0,
                   help="sharegpt: multiply both mean lengths (161 in / 338 out tokens)")
    w.add_argument("--prefix-tokens", type=int, default=256,
                   help="shared-prefix: words of the system prompt every request shares")
    w.add_argument("--turns", type=int, default=4, help="shared-prefix: turns per conversation")
    w.add_argument("--completions", action="store_true", help="/v1/completions, not chat")
    w.add_argument("--requests", type=int,
                   help="measured requests per level (default: max(16, concurrency x "
                        "--requests-per-stream); with --rate: 64)")
    w.add_argument("--requests-per-stream", type=int, default=4)
    w.add_argument("--warmup", type=int,
                   help="unmeasured requests before each level (default: the concurrency)")
    w.add_argument("--warmup-tokens", type=int, default=16, help="tokens each warm-up asks for")
    w.add_argument("--seed", type=int, default=0)

    lo = p.add_argument_group("load")
    lo.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                    help="closed-loop levels; with --rate, the cap on requests in flight")
    lo.add_argument("--rate", type=float, nargs="+",
                    help="open-loop levels instead: Poisson arrivals at these requests/s")
    lo.add_argument("--client-processes", type=_positive, default=1, metavar="N",
                    help="load client processes each level's streams are spread over (at "
                         "most one per stream): one Python client saturates a core at "
                         "roughly 15k streamed chunks/s, so use about one per 128 streams "
                         "on a GPU host; each level reports its busiest client's CPU")
    lo.add_argument("--repeats", type=int, default=1,
                    help="sweeps of each server (rotating the server order); medians reported")
    lo.add_argument("--guidellm", metavar="PATH",
                    help="also drive each server with GuideLLM (its executable, installed "
                         "apart) at every closed-loop level, reported as '<server> · GuideLLM' "
                         "(fixed workload only)")
    lo.add_argument("--guidellm-workers", type=int, default=1,
                    help="GuideLLM client processes (its default is up to 10)")
    lo.add_argument("--wait-quiet", type=float, metavar="LOAD",
                    help="before each level, wait (up to 10 min) for the 1-min load average "
                         "to fall below LOAD; the load seen is recorded either way")

    o = p.add_argument_group("output")
    o.add_argument("--out", help="folder for results.json, report.md and the PNG plots "
                                 "(default: .cache/bench-llm/<time>)")
    o.add_argument("--title", default="", help="title of the plots and the report")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--no-plots", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Dispatch to ``mlx_serving.bench.llm`` (imported only now)."""
    from mlx_serving.bench.llm import run as run_bench

    return run_bench(args)


def add_parsers(sub) -> None:
    """``bench`` and its ``llm`` subcommand on the ``mlx-serving`` command line."""
    bench = sub.add_parser("bench", help="benchmark OpenAI-compatible servers (bench llm --help)")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    llm = kinds.add_parser("llm", help="throughput, TTFT and ITL over a concurrency or rate sweep")
    add_arguments(llm)
    llm.set_defaults(func=run)
