"""The machine's busy CPUs and stolen time over an interval, from /proc/stat."""

import os
import sys
import time

import pytest

from mlx_serving.bench.host_cpu import HostCpuTimes


def stat(tmp_path, name, cpu_line):
    path = tmp_path / name
    path.write_text(f"{cpu_line}\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n")
    return path


def test_busy_cpus_and_stolen_share_between_two_reads(tmp_path):
    # user nice system idle iowait irq softirq steal guest guest_nice
    a = HostCpuTimes.read(stat(tmp_path, "a", "cpu  100 0 50 800 10 5 5 30 0 0"))
    b = HostCpuTimes.read(stat(tmp_path, "b", "cpu  400 20 130 1000 10 15 15 50 7 0"))
    assert (a.busy, a.steal, a.total) == (160, 30, 1000)
    # 420 busy and 20 stolen ticks of 640, on 8 CPUs: 5.25 busy on average
    busy, steal = b.since(a, cpus=8)
    assert busy == pytest.approx(8 * 420 / 640) and steal == pytest.approx(20 / 640)
    assert a.since(a, cpus=8) == (0.0, 0.0)


def test_a_kernel_without_steal_fields_reads_as_none_stolen(tmp_path):
    old = HostCpuTimes.read(stat(tmp_path, "old", "cpu  1 2 3 4 5 6 7"))
    assert (old.busy, old.steal, old.total) == (19, 0, 28)


def test_no_proc_stat_reads_as_unknown(tmp_path):
    assert HostCpuTimes.read(tmp_path / "missing") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_a_spinning_process_shows_as_a_busy_cpu():
    before = HostCpuTimes.read()
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        pass
    busy, steal = HostCpuTimes.read().since(before)
    assert 0.5 <= busy <= os.cpu_count() and 0.0 <= steal <= 1.0
