"""How busy the whole machine's CPUs were over an interval (Linux ``/proc/stat``).

A benchmark level on a shared host can be slowed by CPUs that other processes keep busy, or,
in a virtual machine, by time the hypervisor gives to other guests ("steal"); the load
generator records both for each level so a slow level can be told from a slow server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class HostCpuTimes:
    """The machine's cumulative CPU time in clock ticks, summed over its CPUs."""

    busy: int    # user, nice, system, irq, softirq (guest time is inside user and nice)
    steal: int   # taken by the hypervisor for other guests
    total: int   # all of the above, idle and iowait

    @classmethod
    def read(cls, stat: Path = _STAT) -> HostCpuTimes | None:
        """The times now; None where the OS has no ``/proc/stat`` (macOS)."""
        try:
            fields = stat.read_text().splitlines()[0].split()
        except OSError:
            return None
        user, nice, system, idle, iowait, irq, softirq, *rest = map(int, fields[1:])
        steal = rest[0] if rest else 0
        busy = user + nice + system + irq + softirq
        return cls(busy=busy, steal=steal, total=busy + steal + idle + iowait)

    def since(self, earlier: HostCpuTimes, cpus: int | None = None) -> tuple[float, float]:
        """The mean number of busy CPUs between ``earlier`` and these times (of ``cpus``,
        default this machine's), and the share of the CPU time stolen by the hypervisor."""
        total = self.total - earlier.total
        if total <= 0:
            return 0.0, 0.0
        cpus = cpus or os.cpu_count() or 1
        return cpus * (self.busy - earlier.busy) / total, (self.steal - earlier.steal) / total
