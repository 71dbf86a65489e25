"""The machine's busiest threads over each interval, and the cores they ran on (Linux).

A decode step is bound by its engine thread's core (docs/BENCHMARKS.md, runs 18 and 20), and
replicas beside others step slower than one alone while the machine's CPUs are mostly idle
(run 21). The machine-wide count of busy CPUs cannot tell whether an engine thread shared
its physical core with another busy thread (SMT siblings) or moved between CPUs; this
samples every thread's CPU time and last CPU from ``/proc`` and prints, per interval, the
busy ones with their core, marking threads whose cores were shared. Engine threads name
themselves ``mlx-engine`` in the OS (threads they start, such as MLX's, inherit the name; the
engine thread is the busy one). Each line names the thread's process and that process's
parent: processes that multiprocessing spawned share one command line (an engine's child of a
replica, a load client of ``bench llm``), their parents tell them apart.

    python -m mlx_serving.bench.host_threads --interval 2 > threads.txt   # until killed
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ThreadTimes:
    """One thread's cumulative CPU ticks and the CPU it last ran on."""

    pid: int
    tid: int
    name: str
    ticks: int
    cpu: int
    ppid: int = 0   # its process's parent


@dataclass(frozen=True)
class BusyThread:
    """A thread's CPU seconds per second over an interval, where it ended up, its
    process's command (its first 60 characters) and that process's parent."""

    pid: int
    tid: int
    name: str
    cpu_share: float
    cpu: int
    core: tuple[int, int]   # (package, core) of that CPU
    process: str
    ppid: int = 0


def read_threads(proc: Path = _PROC) -> dict[int, ThreadTimes]:
    """Every thread's times now, by thread id (threads that end while read are skipped)."""
    threads = {}
    for task in proc.glob("[0-9]*/task/[0-9]*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # fields from the 3rd (state) on
        tid = int(task.name)
        threads[tid] = ThreadTimes(pid=int(task.parent.parent.name), tid=tid, name=name,
                                   ticks=int(fields[11]) + int(fields[12]), cpu=int(fields[36]),
                                   ppid=int(fields[1]))
    return threads


def core_of(cpu: int, sys_cpu: Path = Path("/sys/devices/system/cpu")) -> tuple[int, int]:
    """The (package, core) a CPU belongs to; CPUs of one core are SMT siblings."""
    topology = sys_cpu / f"cpu{cpu}" / "topology"
    try:
        return (int((topology / "physical_package_id").read_text()),
                int((topology / "core_id").read_text()))
    except (OSError, ValueError):
        return (0, cpu)


def _command(pid: int, proc: Path = _PROC) -> str:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:60]


def busiest(before: dict[int, ThreadTimes], after: dict[int, ThreadTimes], seconds: float,
            min_share: float = 0.1) -> list[BusyThread]:
    """The threads that used at least ``min_share`` of a CPU between two reads, busiest
    first."""
    busy = []
    for tid, now in after.items():
        then = before.get(tid)
        if then is None:  # started between the reads: its whole life is not one interval's
            continue
        share = (now.ticks - then.ticks) / _TICKS / seconds
        if share >= min_share:
            busy.append(BusyThread(now.pid, tid, now.name, round(share, 2), now.cpu,
                                   core_of(now.cpu), _command(now.pid), now.ppid))
    return sorted(busy, key=lambda t: -t.cpu_share)


def shared_cores(threads: list[BusyThread]) -> set[tuple[int, int]]:
    """The cores two or more of these threads last ran on."""
    return {core for core, n in Counter(t.core for t in threads).items() if n > 1}


def report(threads: list[BusyThread], at_s: float) -> str:
    """One interval's lines: a summary, then each busy thread (``*``: its core was shared)."""
    shared = shared_cores(threads)
    lines = [f"t={at_s:.1f}s busy threads {len(threads)}, "
             f"CPU {sum(t.cpu_share for t in threads):.2f}, shared cores {len(shared)}"]
    lines += [f"  {'*' if t.core in shared else ' '} {t.cpu_share:4.2f} cpu {t.cpu:>3} core "
              f"{t.core[0]}/{t.core[1]:<3} {t.name:<15} pid {t.pid} tid {t.tid} of {t.ppid}  "
              f"{t.process}"
              for t in threads]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interval", type=float, default=2.0, help="seconds per sample")
    p.add_argument("--samples", type=int, default=0, help="how many (0: until killed)")
    p.add_argument("--min-share", type=float, default=0.1,
                   help="the least CPU a thread used to be listed (1.0 = a whole CPU)")
    args = p.parse_args(argv)
    if not _PROC.joinpath("self/task").is_dir():
        print("host_threads needs Linux's /proc", file=sys.stderr)
        return 2
    start = then = time.monotonic()
    before, taken = read_threads(), 0
    while not args.samples or taken < args.samples:
        time.sleep(args.interval)
        after, now = read_threads(), time.monotonic()
        print(report(busiest(before, after, now - then, args.min_share), now - start),
              flush=True)
        before, then, taken = after, now, taken + 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
