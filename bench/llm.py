"""``mlx-serving bench llm``: a sweep of load levels against OpenAI-compatible servers.

Each server (a running one given by URL, or one ``--compare`` starts: ours under
``serve run``, ``mlx_lm.server``) gets the same seeded workload at each level, through
the load generator (``mlx_serving.bench.loadgen``): streaming requests, greedy, fixed
output lengths (``ignore_eos``; a ``logit_bias`` against EOS for servers without it),
warm-up excluded. Servers run one after another, never side by side (they would share
the machine); with ``--repeats`` the order rotates and the median run is reported.
Writes ``results.json`` (every run, the machine, versions and load averages),
``report.md`` and ``throughput.png`` / ``ttft.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import yaml

from mlx_serving.bench.loadgen import HttpTarget, LoadResult, Probe, Workload, run_load
from mlx_serving.bench.report import (describe_environment, environment, load_average,
                                      median_run, ratio_table)
from mlx_serving.bench.servers import (SERVER_NAMES, STARTERS, Endpoint, ServerOptions,
                                       eos_logit_bias)
from mlx_serving.bench.workloads import SharedPrefixChat, ShareGPTLike

DEMO_MODEL = "models/demo-small"
QUIET_WAIT_S = 600
CLIENT_BUSY = 0.9  # a client process's CPU share from which the client may be the limit


@dataclass(frozen=True)
class Level:
    """One load level: closed loop at ``concurrency``, or open loop at ``rate`` req/s with
    at most ``concurrency`` requests in flight."""

    concurrency: int
    rate: float | None = None

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.rate is None else f"{self.rate:g} req/s"


def plan_levels(args: argparse.Namespace) -> list[Level]:
    """The levels to sweep, in order."""
    if args.rate:
        cap = max(args.concurrency)
        return [Level(cap, rate) for rate in args.rate]
    return [Level(n) for n in args.concurrency]


def workload_for(args: argparse.Namespace, level: Level, index: int):
    """The workload of one level: its own seed (``seed + index``, so no level's prompts are
    cached by an earlier one), the same on every server."""
    if args.requests:
        requests = args.requests
    elif level.rate is not None:
        requests = 64
    else:
        requests = max(16, level.concurrency * args.requests_per_stream)
    common = dict(requests=requests, chat=not args.completions, seed=args.seed + index,
                  warmup=level.concurrency if args.warmup is None else args.warmup,
                  warmup_max_tokens=args.warmup_tokens)
    if args.workload == "sharegpt":
        return ShareGPTLike(scale=args.length_scale, **common)
    if args.workload == "shared-prefix":
        return SharedPrefixChat(system_tokens=args.prefix_tokens, turn_tokens=args.input_tokens,
                                max_tokens=args.output_tokens, turns=args.turns, **common)
    return Workload(prompt_tokens=args.input_tokens, max_tokens=args.output_tokens, **common)


def resolve_model(args: argparse.Namespace) -> str | None:
    """The model folder the started servers load (made if it is a generated one)."""
    from mlx_serving.engine.modelgen import ensure_model

    if args.model_size:
        path = Path(args.models_dir) / f"llama-{args.model_size}-{args.model_dtype}"
        return str(ensure_model(path, size=args.model_size, dtype=args.model_dtype))
    if args.model_path:
        return args.model_path
    if args.compare:
        return str(ensure_model(DEMO_MODEL, size="small"))
    return None


Opener = Callable[[], ContextManager[Endpoint]]


def sources(args: argparse.Namespace, options: ServerOptions | None,
            log_dir: Path) -> list[tuple[str, Opener]]:
    """(label, opener) for every server, in order; an opener gives a context manager that
    yields the running ``Endpoint`` (starting and stopping the server if we start it, its
    output logged into ``log_dir``)."""
    found: list[tuple[str, Opener]] = []
    if args.url:
        if not args.model:
            raise SystemExit("error: --url needs --model")
        endpoint = Endpoint(args.label or args.url, args.url, args.model)
        found.append((endpoint.name, lambda e=endpoint: nullcontext(e)))
    for label, url, model in args.endpoint:
        endpoint = Endpoint(label, url, model)
        found.append((label, lambda e=endpoint: nullcontext(e)))
    if args.compare:
        for name in args.servers:
            found.append((SERVER_NAMES[name],
                          lambda n=name: STARTERS[n](options, log_dir=log_dir)))
    if not found:
        raise SystemExit("error: give --url and --model, --endpoint, or --compare")
    return found


async def wait_quiet(limit: float | None) -> tuple[float, float, float] | None:
    """Wait up to ``QUIET_WAIT_S`` for the 1-minute load average to fall below ``limit``
    (no wait when None); returns the load average then."""
    deadline = time.monotonic() + QUIET_WAIT_S
    load = load_average()
    while limit is not None and load and load[0] >= limit and time.monotonic() < deadline:
        await asyncio.sleep(5)
        load = load_average()
    return load


def _replica_probe(url: str) -> Probe:
    """Reads each of our replicas' engine counters (the level keeps their change)."""
    from mlx_serving.bench.replicas import PROBED, settled_counters_by_replica

    async def probe() -> dict[str, float]:
        return await settled_counters_by_replica(url, names=PROBED)
    return probe


async def sweep_endpoint(endpoint: Endpoint, args: argparse.Namespace, levels: list[Level],
                         loads: list, on_level: Callable[[list[LoadResult]], None] | None = None
                         ) -> list[LoadResult]:
    """Every level against one endpoint; appends the load average before each to ``loads``
    and hands the results so far to ``on_level`` after each level."""
    from tqdm import tqdm

    results = []
    probe = _replica_probe(endpoint.url) if endpoint.name == SERVER_NAMES["ours"] else None
    async with HttpTarget(endpoint.url, endpoint.model, args.api_key,
                          max_connections=max(lv.concurrency for lv in levels) + 8,
                          extra_body=endpoint.extra_body) as target:
        for i, level in enumerate(levels):
            workload = workload_for(args, level, i)
            loads.append(await wait_quiet(args.wait_quiet))
            label = level.label
            with tqdm(total=workload.requests, desc=f"{endpoint.name} {label}", unit="req",
                      file=sys.stderr, disable=True if args.no_progress else None) as bar:
                failed = 0

                def done(ok: bool) -> None:
                    nonlocal failed
                    failed += not ok
                    bar.update(1)
                    if failed:
                        bar.set_postfix(failed=failed)

                r = await run_load(target, workload, level.concurrency, probe, rate=level.rate,
                                   on_done=done, processes=args.client_processes)
            results.append(r)
            if on_level:
                on_level(results)
            steady = ("" if r.steady_tok_s is None else
                      f" ({r.steady_tok_s:,.1f} before the drain, {r.steady_s:.1f} s)")
            print(f"{endpoint.name} {label}: {r.output_tok_s:,.1f} tok/s{steady}, TTFT p50 "
                  f"{r.ttft_ms['p50'] or 0:,.0f} ms, {r.requests_ok} ok, {r.requests_failed} "
                  f"failed, {r.requests_short} short, {client_use(r)}; load before "
                  f"{loads[-1]}", file=sys.stderr)
            if warning := client_bound_warning(r):
                print(warning, file=sys.stderr)
    return results


def _client_cpu(r: LoadResult) -> str:
    """The load client's busiest process's CPU share over a level ("-": not measured)."""
    return "-" if r.client_cpu is None else f"{r.client_cpu:.2f}"


def client_use(r: LoadResult) -> str:
    """The load client's busiest process's CPU share over a level, and its processes; and
    the machine's busy CPUs (and the share stolen by a hypervisor, if any) where known."""
    use = (f"client cpu {_client_cpu(r)} "
           f"({r.client_processes} process{'es' * (r.client_processes > 1)})")
    return use if r.host_busy_cpus is None else f"{use}, host {host_use(r)}"


def host_use(r: LoadResult) -> str:
    """The machine's mean busy CPUs over a level, with the share stolen where there was."""
    stolen = f", {100 * r.host_steal:.1f}% stolen" if r.host_steal else ""
    return f"{r.host_busy_cpus:.1f} CPUs busy{stolen}"


def client_bound_warning(r: LoadResult) -> str | None:
    """A warning when a client process was busy enough to limit the level, else None."""
    if r.client_cpu is None or r.client_cpu < CLIENT_BUSY:
        return None
    more = f" (more than {r.client_processes})" if r.client_processes > 1 else ""
    return (f"warning: the load client was busy {100 * r.client_cpu:.0f}% of the level: its "
            f"numbers may be client-bound; use --client-processes{more}")


def client_lines(runs: dict[str, list[list[LoadResult]]], levels: list[str]) -> list[str]:
    """A report line per server the load generator measured: at each level (median run),
    its busiest client process's CPU share and how many processes sent the load."""
    lines = []
    for label, by_level in runs.items():
        shown = [(level, median_run(rs)) for level, rs in zip(levels, by_level) if rs]
        if all(r.client_cpu is None for _, r in shown):
            continue  # not ours (GuideLLM)
        lines.append(f"- load client, {label}: busiest process's CPU (1.0 = a core) and "
                     "processes per level: " + ", ".join(
                         f"{level} {_client_cpu(r)} ({r.client_processes})"
                         for level, r in shown))
        if any(r.steady_tok_s is not None for _, r in shown):
            lines.append(f"- output tok/s before the drain (until the first client sent its "
                         f"last request), {label}: " + ", ".join(
                             f"{level} -" if r.steady_tok_s is None else
                             f"{level} {r.steady_tok_s:,.1f} ({r.steady_s:.1f} of "
                             f"{r.duration_s:.1f} s)" for level, r in shown))
        if any(r.host_busy_cpus is not None for _, r in shown):
            lines.append(f"- host CPU during each level, {label}: " + ", ".join(
                f"{level} {'-' if r.host_busy_cpus is None else host_use(r)}"
                for level, r in shown))
    return lines


def crosscheck_endpoint(endpoint: Endpoint, args: argparse.Namespace, levels: list[Level],
                        model: str, out: Path) -> list[LoadResult] | None:
    """GuideLLM at every level against the same endpoint (its JSON reports kept in
    ``out``); None, with a warning, if it failed."""
    from mlx_serving.bench.crosscheck import load_result, run_guidellm, scenario

    results = []
    for i, level in enumerate(levels):
        workload = workload_for(args, level, i)
        spec = scenario(endpoint.url, endpoint.model, model, level.concurrency, workload.requests,
                        workload.warmup, args.input_tokens, args.output_tokens,
                        chat=not args.completions, api_key=args.api_key, seed=args.seed + i,
                        extra_body=endpoint.extra_body)
        slug = "".join(c if c.isalnum() else "-" for c in endpoint.name)
        path = out / f"guidellm-{slug}-c{level.concurrency}.json"
        print(f"GuideLLM: {endpoint.name} c={level.concurrency}", file=sys.stderr)
        proc = run_guidellm(args.guidellm, spec, path, strip_continuous_usage=True,
                            workers=args.guidellm_workers)
        if proc.returncode != 0 or not path.exists():
            print(f"warning: GuideLLM failed against {endpoint.name} (exit {proc.returncode}): "
                  f"{proc.stdout[-1500:]}", file=sys.stderr)
            return None
        results.append(load_result(json.loads(path.read_text()), level.concurrency))
    return results


def _rotated(items: list, shift: int) -> Iterator:
    shift %= len(items)
    return iter(items[shift:] + items[:shift])


def _eos_targets(args: argparse.Namespace) -> set[str]:
    names = set(args.eos_logit_bias)
    return names | {SERVER_NAMES[n] for n in names if n in SERVER_NAMES}


def server_options(args: argparse.Namespace, model: str) -> ServerOptions:
    """How ``--compare`` starts its servers."""
    return ServerOptions(model_path=model, max_batch_size=args.max_batch_size,
                         replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                         engine={k: yaml.safe_load(v) for k, v in args.engine},
                         deployment={k: yaml.safe_load(v) for k, v in args.deployment},
                         mlx_lm_args=tuple(args.mlx_lm_arg),
                         max_concurrency=max(args.concurrency))


def replica_shares(runs: dict[str, list[list[LoadResult]]], levels: list[str]) -> list[str]:
    """A line per server whose results carry counters by replica: at each level (first
    run), each replica's share of the tokens, its engine steps per second and its tokens
    per step, busiest replica first; then the mean TTFT as the client, the Routers and the
    engines saw it, and the engines' mean queue time (each is a share of the one before)
    and time from admission to the decode batch (in ms and engine steps), and the steps
    from there to the first token; then the engine threads' time by activity, as a share of
    the level's wall time; each replica's mean requests in flight as Serve counts them
    (its streams) and as its engine does, whose difference shows a replica that routing
    thinks busier than its engine is; and each engine thread's CPU seconds per busy second
    (well under 1: a thread that waits for its core, the interpreter lock or the device)
    and its process's CPU seconds per second of the level."""
    from mlx_serving.bench.replicas import (ENGINE_ACTIVITIES, ENGINE_TTFT, FINISHED, IN_ENGINE,
                                            IN_REPLICA, PROCESS_CPU, QUEUED, ROUTER_TTFT_COUNT,
                                            ROUTER_TTFT_SUM, STEPS, THREAD_CPU, TO_DECODE,
                                            TO_DECODE_STEPS, TO_TOKEN_STEPS, TOKENS,
                                            engine_seconds, of_metric)

    lines = []
    for label, by_level in runs.items():
        parts = []
        for level, results in zip(levels, by_level):
            r = results[0] if results else None
            counters = (r.counters or {}) if r else {}
            tokens, by_replica_steps = of_metric(counters, TOKENS), of_metric(counters, STEPS)
            total = sum(tokens.values())
            if not total:
                continue
            order = sorted(tokens, key=tokens.get, reverse=True)
            steps = [by_replica_steps.get(rep, 0.0) for rep in order]
            shares = "/".join(f"{100 * tokens[rep] / total:.0f}%" for rep in order)
            rates = "/".join(f"{n / r.duration_s:.0f}" for n in steps)
            per_step = "/".join(f"{tokens[rep] / n:.1f}" if n else "-"
                                for rep, n in zip(order, steps))
            part = f"{level}: tokens {shares}, steps/s {rates}, tokens per step {per_step}"
            finished = sum(of_metric(counters, FINISHED).values())
            routed = sum(of_metric(counters, ROUTER_TTFT_COUNT).values())
            if finished and routed:
                queued = 1000 * sum(of_metric(counters, QUEUED).values()) / finished
                ttft = 1000 * sum(of_metric(counters, ENGINE_TTFT).values()) / finished
                router = 1000 * sum(of_metric(counters, ROUTER_TTFT_SUM).values()) / routed
                part += (f", TTFT mean client / Router / engine {r.ttft_ms['mean']:.0f} / "
                         f"{router:.0f} / {ttft:.0f} ms, engine queue {queued:.0f} ms")
                if of_metric(counters, TO_DECODE):
                    def mean(name: str) -> float:
                        return sum(of_metric(counters, name).values()) / finished
                    part += (f", admitted to decoding {1000 * mean(TO_DECODE):.0f} ms "
                             f"({mean(TO_DECODE_STEPS):.1f} steps), then "
                             f"{mean(TO_TOKEN_STEPS):.1f} steps to the first token")
            by_activity = [of_metric(counters, engine_seconds(a)) for a in ENGINE_ACTIVITIES]
            seconds = [sum(by_replica.values()) for by_replica in by_activity]
            if any(seconds):
                wall = r.duration_s * len(tokens)
                part += (f", engine time % {' / '.join(ENGINE_ACTIVITIES)} "
                         + " / ".join(f"{100 * x / wall:.0f}" for x in seconds))
            in_replica, in_engine = of_metric(counters, IN_REPLICA), of_metric(counters, IN_ENGINE)
            if in_replica and in_engine:
                part += ", in flight per replica / in its engine " + ", ".join(
                    f"{in_replica.get(rep, 0.0) / r.duration_s:.1f}/"
                    f"{in_engine.get(rep, 0.0) / r.duration_s:.1f}" for rep in order)
            thread_cpu = of_metric(counters, THREAD_CPU)
            process_cpu = of_metric(counters, PROCESS_CPU)
            busy = {rep: sum(by_replica.get(rep, 0.0) for by_replica in by_activity)
                    for rep in order}
            if thread_cpu and all(busy.values()):
                part += ", engine thread CPU per busy s / process CPU per s " + ", ".join(
                    f"{thread_cpu.get(rep, 0.0) / busy[rep]:.2f}/"
                    f"{process_cpu.get(rep, 0.0) / r.duration_s:.2f}" for rep in order)
            parts.append(part)
        if parts:
            lines.append(f"\n{label}, by replica (busiest first): " + "; ".join(parts))
    return lines


def _add(runs: dict[str, list[list[LoadResult]]], label: str, results: list[LoadResult]) -> None:
    by_level = runs.setdefault(label, [[] for _ in results])
    for i, r in enumerate(results):
        by_level[i].append(r)


def _exit_on_signal(signum: int, _frame) -> None:
    print(f"bench llm: stopped by signal {signum}; stopping the servers it started",
          file=sys.stderr)
    sys.exit(128 + signum)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; exits 1 when some level had no successful request. SIGTERM ends
    it as Ctrl-C does, through every cleanup, so the servers it started stop too."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    levels = plan_levels(args)
    model = resolve_model(args)
    if args.guidellm and (args.rate or args.workload != "fixed" or not model):
        raise SystemExit("error: --guidellm runs closed-loop fixed workloads and needs the "
                         "model path (its tokenizer)")
    bias_for = _eos_targets(args)
    if bias_for and not model:
        raise SystemExit("error: --eos-logit-bias needs --model-path (to read the EOS ids)")
    bias = eos_logit_bias(model) if bias_for else {}
    out = Path(args.out or f".cache/bench-llm/{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    servers = sources(args, server_options(args, model) if args.compare else None, out)
    record = {"environment": environment(),
              "args": {k: v for k, v in vars(args).items() if k != "func"},
              "model_path": model, "workload_kind": args.workload,
              "workloads": [asdict(workload_for(args, lv, i)) for i, lv in enumerate(levels)],
              "levels": [asdict(lv) for lv in levels], "servers": {}}
    runs: dict[str, list[list[LoadResult]]] = {label: [[] for _ in levels] for label, _ in servers}

    for repeat in range(args.repeats):
        for label, opener in _rotated(servers, repeat):
            loads: list = []
            with opener() as endpoint:
                if label in bias_for:
                    endpoint.extra_body = {**endpoint.extra_body, "logit_bias": bias}
                entry = record["servers"].setdefault(
                    label, {"url": endpoint.url, "model": endpoint.model,
                            "command": endpoint.command, "extra_body": endpoint.extra_body,
                            "runs": []})
                entry["runs"].append([])

                def keep(results: list[LoadResult]) -> None:
                    """results.json after every level: a sweep stopped midway (a time limit,
                    SIGTERM) keeps the levels it finished."""
                    entry["runs"][-1] = [{"load_before": load, **r.to_dict()}
                                         for load, r in zip(loads, results)]
                    save_record(out, record)

                results = asyncio.run(sweep_endpoint(endpoint, args, levels, loads, keep))
                checked = (crosscheck_endpoint(endpoint, args, levels, model, out)
                           if args.guidellm else None)
            _add(runs, label, results)
            if checked:
                entry.setdefault("guidellm_runs", []).append([r.to_dict() for r in checked])
                _add(runs, f"{label} · GuideLLM", checked)
                save_record(out, record)

    baseline = args.baseline or (SERVER_NAMES["mlx_lm"] if SERVER_NAMES["mlx_lm"] in runs
                                 else next(iter(runs)))
    print(write_outputs(out, args, record, runs, baseline))
    print(f"\nwrote {out}/", file=sys.stderr)
    for label, by_level in runs.items():
        short = sum(r.requests_short for rs in by_level for r in rs)
        if short:
            print(f"warning: {short} {label} responses ended before their max_tokens (EOS not "
                  f"ignored): the servers did unequal work; rerun with --eos-logit-bias "
                  f"'{label}'", file=sys.stderr)
    return 1 if any(r.requests_ok == 0 for rs in runs.values() for lv in rs for r in lv) else 0


def save_record(out: Path, record: dict) -> None:
    """``record`` as ``out``/results.json."""
    (out / "results.json").write_text(json.dumps(record, indent=2))


def write_outputs(out: Path, args: argparse.Namespace, record: dict,
                  runs: dict[str, list[list[LoadResult]]], baseline: str) -> str:
    """results.json, report.md and the plots; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    save_record(out, record)
    workload = record["workloads"][0]
    loads = {label: [run[i]["load_before"] for run in entry["runs"] for i in range(len(run))]
             for label, entry in record["servers"].items()}
    level_labels = [Level(**lv).label for lv in record["levels"]]
    lines = [f"# {args.title or 'mlx-serving bench llm'}", "",
             f"- machine: {describe_environment(record['environment'])}",
             f"- model: {record['model_path'] or args.model}",
             f"- workload: {record['workload_kind']} "
             + ", ".join(f"{k}={v}" for k, v in workload.items() if k not in ("seed", "requests"))
             + f"; requests per level: {[w['requests'] for w in record['workloads']]}",
             f"- repeats: {args.repeats} (median run shown, min–max of tok/s in brackets)",
             *(f"- {label}: `{entry['command'] or entry['url']}`"
               + (f", extra body {json.dumps(entry['extra_body'])}" if entry["extra_body"] else "")
               for label, entry in record["servers"].items()),
             *(f"- load average (1/5/15 min) before each level, {label}: "
               + ", ".join("/".join(f"{x:.1f}" for x in ld) if ld else "-" for ld in lds)
               for label, lds in loads.items()),
             *client_lines(runs, level_labels),
             "", ratio_table(runs, baseline),
             *replica_shares(runs, level_labels)]
    if not args.no_plots:
        from mlx_serving.bench.plots import plot_sweep

        for path in plot_sweep(runs, out, args.title):
            lines.append(f"\n![{path.stem}]({path.name})")
    report = "\n".join(lines)
    (out / "report.md").write_text(report + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m mlx_serving.bench.llm`` (the same as ``mlx-serving bench llm``)."""
    from mlx_serving.bench.llm_args import add_arguments

    p = argparse.ArgumentParser(prog="mlx-serving bench llm")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
