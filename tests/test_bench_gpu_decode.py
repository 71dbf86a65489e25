"""bench.gpu_decode: decode rates of processes decoding at once, alone and beside busy CPUs,
on the tiny model (on a CPU box every "GPU" process shares the CPU backend)."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from mlx_serving.bench.gpu_decode import _CPU_LOADS, main


@pytest.mark.parametrize("kind", ["spin", "memory"])
def test_each_group_reports_every_process_rate_alone_and_beside_busy_cpus(tiny_model_path,
                                                                          tmp_path, capsys,
                                                                          kind):
    out = tmp_path / "rates.json"
    assert main(["--model", str(tiny_model_path), "--groups", "0", "0,1", "--batch", "4",
                 "--window", "1", "--cpu-load", "1", "--cpu-load-kind", kind,
                 "--json", str(out)]) == 0
    rates = json.loads(out.read_text())["rates"]
    assert [(r["group"], r["gpu"], r["cpu_load"]) for r in rates] == [
        ("0", "0", 0), ("0,1", "0", 0), ("0,1", "1", 0),
        ("0", "0", 1), ("0,1", "0", 1), ("0,1", "1", 1)]
    assert {r["cpu_load_kind"] for r in rates} == {kind}
    assert all(r["steps_s"] > 0 and 0 < r["cpu_per_wall"] < 4 for r in rates), rates
    printed = capsys.readouterr().out
    assert printed.count("steps/s") == 6 and printed.count(f"busy CPUs ({kind})") == 3


@pytest.mark.parametrize("kind", sorted(_CPU_LOADS))
def test_a_cpu_load_runs_until_stopped(kind):
    stop = multiprocessing.Event()
    load = multiprocessing.Process(target=_CPU_LOADS[kind], args=(stop,))
    load.start()
    try:
        time.sleep(1.0)
        assert load.is_alive()
    finally:
        stop.set()
        load.join(10)
    assert load.exitcode == 0


def test_a_window_too_short_for_a_full_step_says_so(tiny_model_path):
    with pytest.raises(RuntimeError, match="GPU 0: no two steps decoded all 64 sequences "
                                           "within 0.001 s: lengthen --window"):
        main(["--model", str(tiny_model_path), "--batch", "64", "--window", "0.001"])


@pytest.mark.parametrize("driver", ["engine", "engine-process"])
def test_the_engine_drivers_report_full_batch_steps_of_the_engine(tiny_model_path, tmp_path,
                                                                   driver):
    out = tmp_path / "rates.json"
    assert main(["--model", str(tiny_model_path), "--groups", "0", "0,1", "--batch", "4",
                 "--window", "1", "--driver", driver, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["driver"] == driver
    assert [(r["group"], r["gpu"], r["driver"]) for r in result["rates"]] == [
        ("0", "0", driver), ("0,1", "0", driver), ("0,1", "1", driver)]
    assert all(r["steps_s"] > 0 and 0 < r["cpu_per_wall"] < 4 for r in result["rates"])


def test_an_engine_window_longer_than_the_requests_says_so(tiny_model_path):
    with pytest.raises(RuntimeError, match="GPU 0: a request ended within the 600.0 s window"):
        main(["--model", str(tiny_model_path), "--batch", "2", "--window", "600",
              "--driver", "engine"])
