"""Tables and the record of a benchmark run: one row per server and load level.

Repeated runs of a level are summarised by their median run (by output tokens/s), whose
metrics are reported together, so a row's numbers all come from one run.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from mlx_serving.bench.loadgen import LoadResult

REPO = Path(__file__).resolve().parent.parent


def level_label(result: LoadResult) -> str:
    """How a level is named in tables and plots: its concurrency, or its request rate."""
    if result.rate is None:
        return str(result.concurrency)
    return f"{result.rate:g} req/s (≤{result.concurrency})"


def median_run(results: list[LoadResult]) -> LoadResult:
    """The run with the median output tokens/s (the lower middle one of an even count)."""
    ranked = sorted(results, key=lambda r: r.output_tok_s)
    return ranked[(len(ranked) - 1) // 2]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def ratio_table(runs: dict[str, list[list[LoadResult]]], baseline: str) -> str:
    """A markdown table comparing servers level by level. ``runs`` maps each server to,
    per level, its repeated results; every server's tokens/s is divided by ``baseline``'s."""
    lines = [f"| level | server | output tok/s | ÷ {baseline} | req/s | TTFT p50 / p90 / p99 ms "
             "| ITL p50 / p99 ms | E2E p50 / p99 ms | ok / failed / short |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    levels = len(next(iter(runs.values())))
    for i in range(levels):
        base = median_run(runs[baseline][i]).output_tok_s if baseline in runs else None
        for server, by_level in runs.items():
            r = median_run(by_level[i])
            spread = ""
            if len(by_level[i]) > 1:
                tok = [x.output_tok_s for x in by_level[i]]
                spread = f" ({min(tok):,.1f}–{max(tok):,.1f})"
            ratio = f"{r.output_tok_s / base:.2f}" if base else "-"
            t, it, e = r.ttft_ms, r.itl_ms, r.e2e_ms
            lines.append(
                f"| {level_label(r)} | {server} | {r.output_tok_s:,.1f}{spread} | {ratio} "
                f"| {r.requests_s:,.2f} | {_ms(t['p50'])} / {_ms(t['p90'])} / {_ms(t['p99'])} "
                f"| {_ms(it['p50'])} / {_ms(it['p99'])} | {_ms(e['p50'])} / {_ms(e['p99'])} "
                f"| {r.requests_ok} / {r.requests_failed} / {r.requests_short} |")
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _git() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               text=True, capture_output=True, timeout=10).stdout.strip()
        return f"{sha}{'+dirty' if dirty else ''}" if sha else "-"
    except (OSError, subprocess.SubprocessError):
        return "-"


def environment() -> dict:
    """The machine and software a run used (for the JSON record and the report)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "git": _git(),
            **{p: _version(p) for p in ("mlx", "mlx-cpu", "mlx-cuda-13", "mlx-lm", "ray")}}


def describe_environment(env: dict) -> str:
    """One line naming the machine and versions."""
    backends = ", ".join(f"{p} {env[p]}" for p in ("mlx", "mlx-cpu", "mlx-cuda-13", "mlx-lm", "ray")
                         if env.get(p, "-") != "-")
    return (f"{env['host']}: {env['cpu']}, {env['cores']} cores; Python {env['python']}, "
            f"{backends}; mlx-serving {env['git']}")


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None
