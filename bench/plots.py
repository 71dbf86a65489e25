"""PNG plots of a sweep: output throughput and TTFT against the load level, one line per
server (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from mlx_serving.bench.loadgen import LoadResult
from mlx_serving.bench.report import median_run


def _x(result: LoadResult) -> float:
    return result.concurrency if result.rate is None else result.rate


def plot_sweep(runs: dict[str, list[list[LoadResult]]], out_dir: Path, title: str = "") -> list[Path]:
    """Write ``throughput.png`` (output tokens/s) and ``ttft.png`` (TTFT p50, and p99
    dashed) into ``out_dir``; ``runs`` maps each server to its repeated results per level.
    Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    medians = {server: [median_run(rs) for rs in by_level] for server, by_level in runs.items()}
    by_rate = next(iter(medians.values()))[0].rate is not None
    xlabel = "offered request rate (req/s)" if by_rate else "concurrent streams"
    panels = {
        "throughput": ("output tokens/s", [(lambda r: r.output_tok_s, "-", "")]),
        "ttft": ("time to first token (ms), p50 solid, p99 dashed",
                 [(lambda r: r.ttft_ms["p50"], "-", ""), (lambda r: r.ttft_ms["p99"], "--", " p99")]),
    }
    written = []
    for name, (ylabel, lines) in panels.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for server, results in medians.items():
            xs = [_x(r) for r in results]
            color = None
            for metric, style, suffix in lines:
                line, = ax.plot(xs, [metric(r) for r in results], style, marker="o",
                                color=color, label=server + suffix)
                color = line.get_color()  # a server's lines share its colour
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({_x(r) for rs in medians.values() for r in rs}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} — {name}" if title else name)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
