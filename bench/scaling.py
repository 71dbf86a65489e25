"""Scaling efficiency of the multi-GPU runs: N replicas of one GPU each against one replica,
from the result folders of ``mlx-serving bench llm`` (``bench/gpu_suite.sh``'s ``gpus-N``
steps, any number of repeats and folders).

A level of N replicas is set against the one-replica levels with as many streams per replica
and the same setup: the workload (prompt and output tokens, requests per stream), the batch
size, and the ``--engine`` and ``--deployment`` settings.
Its efficiency is its output tok/s over N times the one replica's: over the whole level, and
before the drain (``steady_tok_s``, until the first client ran out of requests). Repeats count
by their mean; "paired" also sets the i-th repeat of N replicas against the i-th of one, in the
order the folders and their repeats are given (each repeat ran on freshly started servers, so
this shows how far the figure moves between server starts).

Per replica, the engine steps and the decode seconds per step tell the two losses apart: a
replica that stepped slower beside the others (more ms per step), and one that the Routers
handed more work than its batch held (more steps, at fewer tokens each, and a longer drain).
The share of the host's CPU time a hypervisor took for other guests over the level ("stolen")
is beside them: on a virtual machine, an engine bound by host work steps slower when it rises.

    python -m mlx_serving.bench.scaling OUT/gpus-1 OUT/gpus-2 OUT/gpus-4 [--json scaling.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_serving.bench.loadgen import LoadResult
from mlx_serving.bench.replicas import STEPS, engine_seconds, of_metric
from mlx_serving.bench.servers import SERVER_NAMES

DECODE = engine_seconds("decode")


@dataclass(frozen=True)
class ReplicaFigures:
    """One replica's engine over one measured level."""

    steps: float
    decode_s: float

    @property
    def decode_ms_per_step(self) -> float | None:
        return 1000 * self.decode_s / self.steps if self.steps else None


@dataclass(frozen=True)
class Measured:
    """One repeat of one level of one result folder."""

    folder: str
    replicas: int
    setup: str  # what else must match for two levels to compare: workload, batch, settings
    result: LoadResult

    @property
    def streams_per_replica(self) -> int:
        return self.result.concurrency // self.replicas

    def by_replica(self) -> list[ReplicaFigures]:
        """Each replica's figures, the one that ran the most steps first (empty when the
        folder did not read our replicas' counters)."""
        counters = self.result.counters or {}
        steps, decode = of_metric(counters, STEPS), of_metric(counters, DECODE)
        figures = [ReplicaFigures(steps[r], decode.get(r, 0.0)) for r in steps]
        return sorted(figures, key=lambda f: f.steps, reverse=True)


@dataclass(frozen=True)
class Efficiency:
    """N replicas against one, at one number of streams per replica."""

    replicas: int
    streams_per_replica: int
    setup: str
    repeats: int
    baseline_repeats: int
    tok_s: float  # means over the repeats
    baseline_tok_s: float
    whole: float
    steady: float | None  # before the drain
    paired: list[float]


def load(folder: Path) -> list[Measured]:
    """Every repeat of every level of our server in ``folder``/results.json."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"error: {folder}: no results.json (not a bench llm result folder)")
    record = json.loads(path.read_text())
    runs = record["servers"].get(SERVER_NAMES["ours"], {}).get("runs")
    if runs is None:
        raise SystemExit(f"error: {folder}: no mlx-serving runs in results.json")
    args = record.get("args", {})
    setup = "; ".join([f"{args.get('workload')} {args.get('input_tokens')}->"
                       f"{args.get('output_tokens')} x{args.get('requests_per_stream')}",
                       f"batch {args.get('max_batch_size')}",
                       *(f"{k}={v}" for k, v in args.get("engine") or []),
                       *(args.get("deployment") or [])])
    out: list[Measured] = []
    for run in runs:
        for level in run:
            fields = {k: v for k, v in level.items() if k != "load_before"}
            result = LoadResult(**fields)
            replicas = args.get("replicas") or len(of_metric(result.counters or {}, STEPS)) or 1
            out.append(Measured(str(folder), int(replicas), setup, result))
    return out


def efficiencies(measured: list[Measured]) -> list[Efficiency]:
    """N replicas (N > 1) against one replica at each streams-per-replica and setup both
    ran."""
    groups: dict[tuple[str, int, int], list[Measured]] = {}
    for m in measured:
        groups.setdefault((m.setup, m.replicas, m.streams_per_replica), []).append(m)
    rows = []
    for (setup, replicas, per), runs in sorted(groups.items()):
        base = groups.get((setup, 1, per))
        if replicas == 1 or not base:
            continue
        tok = statistics.fmean(m.result.output_tok_s for m in runs)
        base_tok = statistics.fmean(m.result.output_tok_s for m in base)
        steady = [m.result.steady_tok_s for m in runs]
        base_steady = [m.result.steady_tok_s for m in base]
        rows.append(Efficiency(
            replicas, per, setup, len(runs), len(base), round(tok, 1), round(base_tok, 1),
            whole=round(tok / (replicas * base_tok), 3),
            steady=None if None in steady + base_steady else round(
                statistics.fmean(steady) / (replicas * statistics.fmean(base_steady)), 3),
            paired=[round(m.result.output_tok_s / (replicas * b.result.output_tok_s), 3)
                    for m, b in zip(runs, base)]))
    return rows


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(measured: list[Measured]) -> str:
    """Markdown: every measured level with its replicas, then the efficiency table."""
    lines = ["| replicas | streams | setup | folder | output tok/s | before the drain "
             "| TTFT p99 ms | steps per replica | decode ms per step | host CPU stolen |",
             "|---:|---:|---|---|---:|---:|---:|---|---|---:|"]
    for m in sorted(measured, key=lambda m: (m.setup, m.replicas, m.result.concurrency)):
        r, figures = m.result, m.by_replica()
        lines.append(
            f"| {m.replicas} | {r.concurrency} | {m.setup} | {Path(m.folder).name} "
            f"| {r.output_tok_s:,.0f} | {_number(r.steady_tok_s, 0)} "
            f"| {_number(r.ttft_ms.get('p99'), 0)} "
            f"| {', '.join(f'{f.steps:.0f}' for f in figures) or '-'} "
            f"| {', '.join(_number(f.decode_ms_per_step, 1) for f in figures) or '-'} "
            f"| {'-' if r.host_steal is None else f'{100 * r.host_steal:.1f}%'} |")
    rows = efficiencies(measured)
    lines += ["", "| replicas | streams per replica | setup | repeats (1 replica) "
              "| output tok/s (1 replica) | efficiency | before the drain | paired in order |",
              "|---:|---:|---|---|---|---:|---:|---|"]
    lines += [f"| {e.replicas} | {e.streams_per_replica} | {e.setup} "
              f"| {e.repeats} ({e.baseline_repeats}) "
              f"| {e.tok_s:,.0f} ({e.baseline_tok_s:,.0f}) | {e.whole:.2f} "
              f"| {_number(e.steady, 2)} | {', '.join(f'{p:.2f}' for p in e.paired)} |"
              for e in rows]
    if not rows:
        lines.append("\nno level of several replicas has a one-replica level with as many "
                     "streams per replica and setup")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_serving.bench.scaling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench llm result folders")
    parser.add_argument("--json", type=Path, help="also write the efficiencies here")
    args = parser.parse_args(argv)
    measured = [m for folder in args.folders for m in load(folder)]
    print(report(measured))
    if args.json:
        args.json.write_text(json.dumps([asdict(e) for e in efficiencies(measured)], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
