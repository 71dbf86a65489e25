"""One workload along several paths, side by side.

Each load level runs every path in turn, ``repeats`` times, in a rotating order, so that
drift of a shared or noisy machine falls on every path alike. Each path has a probe that
reads its engine's counters; the report gives medians over repeats, each path against
the first (the baseline) both as a ratio of medians and as the median of each repeat's
paired ratio, with the engine's steps/s, tokens per step, prefill passes and prefill share
of time, which tell a slower step from an emptier batch, and where the engine thread's
time went (decode steps, batch changes, token hand-off, idle), which tells a slower step
from work between steps.
"""

from __future__ import annotations

import statistics

from mlx_serving.bench.loadgen import LoadResult, Probe, Target, Workload, run_load

ENGINE_COUNTERS = ("steps", "prefill_steps", "prefill_s", "decode_s", "generated_tokens", "pauses",
                   "finished", "queued_s", "ttft_s", "to_decode_s", "to_decode_steps",
                   "to_token_steps", "join_s", "admit_s", "release_s", "tokens_s", "idle_s")

Runs = dict[int, dict[str, list[LoadResult]]]  # concurrency -> path -> one result per repeat


def engine_counters(stats: dict) -> dict[str, float]:
    """The counters the report reads, from ``EngineStats`` as a dict."""
    return {k: stats[k] for k in ENGINE_COUNTERS}


async def drive(targets: dict[str, tuple[Target, Probe]], levels: list[tuple[int, Workload]],
                repeats: int) -> Runs:
    """Every level along every path (``targets``: path -> its target and probe)."""
    paths = list(targets)
    runs: Runs = {}
    for n, workload in levels:
        runs[n] = {path: [] for path in paths}
        for r in range(repeats):
            shift = r % len(paths)
            for path in paths[shift:] + paths[:shift]:
                target, probe = targets[path]
                runs[n][path].append(await run_load(target, workload, n, probe))
    return runs


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _engine_side(results: list[LoadResult]) -> str:
    """Medians of engine steps/s, tokens per step, prefill passes, prefill share of time."""
    counted = [(r.counters, r.duration_s) for r in results if r.counters and r.counters["steps"]]
    if not counted:
        return "-"
    steps_s = _median([c["steps"] / d for c, d in counted])
    per_step = _median([c["generated_tokens"] / c["steps"] for c, _ in counted])
    passes = _median([c["prefill_steps"] for c, _ in counted])
    prefill = _median([100 * c["prefill_s"] / d for c, d in counted])
    pauses = sum(c["pauses"] for c, _ in counted)
    return f"{steps_s:,.0f} / {per_step:.1f} / {passes:.0f} / {prefill:.0f}% / {pauses:.0f}"


def _engine_time(results: list[LoadResult]) -> str:
    """Medians of the engine thread's time as shares of the run: in decode steps, moving
    prefilled sequences into the decode batch, putting sequences into the batch and taking
    them out, handing tokens over, and idle."""
    counted = [(r.counters, r.duration_s) for r in results if r.counters and r.duration_s]
    if not counted:
        return "-"
    keys = ("decode_s", "join_s", "admit_s", "release_s", "tokens_s", "idle_s")
    return " / ".join(f"{_median([100 * c[k] / d for c, d in counted]):.0f}" for k in keys)


def _engine_ttft(results: list[LoadResult]) -> str:
    """Medians of the engine's mean queue time, mean time from admission to the decode
    batch (and its steps), and mean TTFT (from its arrival at the engine; a request ended
    before its first token counts 0); the client's TTFT less this is the serving path's
    share."""
    counted = [r.counters for r in results if r.counters and r.counters["finished"]]
    if not counted:
        return "-"

    def mean(key: str, scale: float = 1000) -> float:
        return _median([scale * c[key] / c["finished"] for c in counted])
    return (f"{mean('queued_s'):.0f} / {mean('to_decode_s'):.0f} "
            f"({mean('to_decode_steps', 1):.1f}) / {mean('ttft_s'):.0f}")


def _paired(results: list[LoadResult], baseline: list[LoadResult]) -> str:
    """Median (min–max) over repeats of each run's tok/s against the baseline's run of the
    same repeat: the runs of one repeat are neighbours in time, so the machine's drift
    between repeats cancels out."""
    ratios = [r.output_tok_s / b.output_tok_s for r, b in zip(results, baseline)
              if b.output_tok_s]
    if not ratios:
        return "-"
    return f"{_median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})"


def _failed(results: list[LoadResult]) -> str:
    failed = sum(r.requests_failed for r in results)
    return f"; {failed} failed" if failed else ""


def report(runs: Runs, names: dict[str, str]) -> str:
    """A markdown table; ``names`` gives each path's label, the first path is the baseline.
    A path with failed requests says so beside its tok/s: such runs do less work."""
    baseline = next(iter(names))
    lines = [f"| concurrent | path | tok/s median (min–max) | ÷ {names[baseline]} "
             "| paired ÷, median (min–max) | TTFT p50 ms "
             "| TTFT mean ms | engine queue / to decoding (steps) / TTFT mean ms | ITL p50 ms "
             "| engine steps/s / tokens per step / prefill passes / prefill time / pauses "
             "| engine time %: decode / join / admit / release / tokens / idle |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, by_path in runs.items():
        base = _median([r.output_tok_s for r in by_path[baseline]])
        for path, name in names.items():
            results = by_path[path]
            tok_s = [r.output_tok_s for r in results]
            lines.append(
                f"| {n} | {name} | {_median(tok_s):,.0f} ({min(tok_s):,.0f}–{max(tok_s):,.0f})"
                f"{_failed(results)} | {_median(tok_s) / base:.3f} "
                f"| {_paired(results, by_path[baseline])} "
                f"| {_median([r.ttft_ms['p50'] for r in results]):.0f} "
                f"| {_median([r.ttft_ms['mean'] for r in results]):.0f} "
                f"| {_engine_ttft(results)} "
                f"| {_median([r.itl_ms['p50'] for r in results]):.1f} | {_engine_side(results)} "
                f"| {_engine_time(results)} |")
    return "\n".join(lines)
