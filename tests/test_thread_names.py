"""The engine thread carries its name in the OS (``top -H``, ``/proc/PID/task/TID/comm``), and
bench.host_threads finds busy threads by it."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from mlx_serving.bench.host_threads import busiest, main, read_threads, report
from mlx_serving.engine import Engine, EngineConfig, ModelConfig
from mlx_serving.engine.thread_names import name_this_thread

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _os_names() -> list[str]:
    return [p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")]


def _spin(stop: threading.Event, name: str) -> None:
    name_this_thread(name)
    while not stop.is_set():
        sum(range(1000))


@linux_only
def test_a_thread_named_in_the_os_keeps_its_first_15_bytes():
    named, release = threading.Event(), threading.Event()

    def named_thread() -> None:
        name_this_thread("mlx-a-long-thread-name")
        named.set()
        release.wait(5)  # alive until its name has been read

    thread = threading.Thread(target=named_thread)
    thread.start()
    try:
        assert named.wait(5)
        assert "mlx-a-long-thre" in _os_names()
    finally:
        release.set()
        thread.join()


@linux_only
def test_the_engine_thread_is_named_mlx_engine(tiny_model_path):
    engines_before = _os_names().count("mlx-engine")  # other tests' engines may still run
    engine = Engine(EngineConfig(models=[ModelConfig(name="tiny", path=str(tiny_model_path))]))
    try:
        # threads the engine thread starts (MLX's workers) inherit its name
        assert _os_names().count("mlx-engine") > engines_before
    finally:
        engine.shutdown()


@linux_only
def test_host_threads_lists_a_busy_thread_with_its_core(capsys):
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop, "busy-spinner"))
    spinner.start()
    try:
        before = read_threads()
        stop.wait(1.0)
        busy = busiest(before, read_threads(), 1.0)
        assert main(["--interval", "0.5", "--samples", "2"]) == 0
    finally:
        stop.set()
        spinner.join()
    mine = [t for t in busy if t.name == "busy-spinner"]
    assert len(mine) == 1 and mine[0].cpu_share > 0.3 and mine[0].tid == spinner.native_id
    assert mine[0].pid == os.getpid() and mine[0].ppid == os.getppid()
    assert f"tid {spinner.native_id} of {os.getppid()}  " in report(busy, 1.0)
    printed = capsys.readouterr().out
    assert printed.count("busy threads") == 2 and "busy-spinner" in printed
