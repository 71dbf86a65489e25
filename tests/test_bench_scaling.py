"""bench.scaling: the efficiency of N replicas against one, from bench llm result folders
written as bench llm writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_serving.bench.llm import save_record
from mlx_serving.bench.loadgen import LoadResult
from mlx_serving.bench.replicas import STEPS, engine_seconds
from mlx_serving.bench.scaling import efficiencies, load, main


def level(streams: int, tok_s: float, steady: float | None,
          replicas: dict[str, tuple[float, float]], steal: float | None = None) -> dict:
    """A level as results.json keeps it; ``replicas`` maps a replica to (steps, decode s)."""
    counters = {}
    for name, (steps, decode_s) in replicas.items():
        counters[f"{STEPS}@{name}"] = steps
        counters[f'{engine_seconds("decode")}@{name}'] = decode_s
    result = LoadResult(concurrency=streams, requests_ok=4 * streams, requests_failed=0,
                        errors={}, duration_s=20.0, output_tokens=int(20 * tok_s),
                        output_tok_s=tok_s, requests_s=1.0,
                        ttft_ms={"p50": 900.0, "p90": 1500.0, "p99": 2000.0},
                        itl_ms={}, e2e_ms={}, counters=counters, steady_tok_s=steady,
                        host_steal=steal)
    return {"load_before": [0.5, 0.5, 0.5], **result.to_dict()}


def folder(root: Path, name: str, replicas: int, runs: list[list[dict]],
           batch: int = 160, requests_per_stream: int = 4) -> Path:
    out = root / name
    out.mkdir()
    save_record(out, {"args": {"replicas": replicas, "max_batch_size": batch,
                               "workload": "fixed", "input_tokens": 128, "output_tokens": 128,
                               "requests_per_stream": requests_per_stream,
                               "engine": [["prefill_batch_size", "16"]], "deployment": []},
                      "servers": {"mlx-serving": {"runs": runs}}})
    return out


def test_n_replicas_against_one_by_mean_before_the_drain_and_paired(tmp_path, capsys):
    one = folder(tmp_path, "gpus-1", 1, [[level(128, 3000.0, 2900.0, {"a": (550, 13.2)})],
                                         [level(128, 2000.0, 2100.0, {"b": (560, 16.8)})]])
    two = folder(tmp_path, "gpus-2", 2, [
        [level(256, 4500.0, 4600.0, {"c": (617, 16.0), "d": (550, 13.75)}, steal=0.0224)],
        [level(256, 5500.0, 5400.0, {"e": (555, 13.9), "f": (556, 13.9)})]])

    (row,) = efficiencies(load(one) + load(two))
    assert (row.replicas, row.streams_per_replica, row.repeats, row.baseline_repeats) == (
        2, 128, 2, 2)
    assert (row.tok_s, row.baseline_tok_s) == (5000.0, 2500.0)
    assert row.whole == 1.0 and row.steady == 1.0
    assert row.paired == [0.75, 1.375]  # 4500 / (2 x 3000), 5500 / (2 x 2000)

    out = tmp_path / "scaling.json"
    assert main([str(one), str(two), "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["whole"] == 1.0
    report = capsys.readouterr().out
    # per replica, the one with the most steps first, with its decode ms per step; the share
    # of the host's CPU a hypervisor took ("-" where not known)
    setup = "fixed 128->128 x4; batch 160; prefill_batch_size=16"
    assert (f"| 2 | 256 | {setup} | gpus-2 | 4,500 | 4,600 | 2,000 | 617, 550 | 25.9, 25.0 "
            f"| 2.2% |") in report
    assert f"| 1 | 128 | {setup} | gpus-1 | 3,000 | 2,900 | 2,000 | 550 | 24.0 | - |" in report
    assert f"| 2 | 128 | {setup} | 2 (2) | 5,000 (2,500) | 1.00 | 1.00 | 0.75, 1.38 |" in report


def test_levels_of_another_setup_or_streams_per_replica_are_not_compared(tmp_path, capsys):
    one = folder(tmp_path, "gpus-1", 1, [[level(128, 3000.0, None, {"a": (550, 13.2)})]])
    other_batch = folder(tmp_path, "gpus-4-b128", 4,
                         [[level(512, 10000.0, None, {"b": (600, 15.0)})]], batch=128)
    other_streams = folder(tmp_path, "gpus-2", 2, [[level(128, 6000.0, None, {"c": (550, 13.0)})]])
    other_requests = folder(tmp_path, "gpus-2-rps8", 2,
                            [[level(256, 6000.0, None, {"d": (1100, 27.0)})]],
                            requests_per_stream=8)

    folders = [one, other_batch, other_streams, other_requests]
    assert efficiencies([m for f in folders for m in load(f)]) == []
    assert main([str(f) for f in folders]) == 0
    assert "no level of several replicas has a one-replica level with as many streams per " \
           "replica and setup" in capsys.readouterr().out


def test_a_folder_without_results_says_which(tmp_path):
    with pytest.raises(SystemExit, match=f"error: {tmp_path}: no results.json"):
        main([str(tmp_path)])
