"""Tests for mlx_serving.canary.bucketing against the shared vectors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mlx_serving.canary import bucket, routes_to_canary
from mlx_serving.canary.bucketing import BUCKETS, weight_threshold

VECTORS = json.loads((Path(__file__).parent / "data" / "canary" / "bucketing_vectors.json")
                     .read_text(encoding="utf-8"))["vectors"]


def test_vectors_cover_what_they_should():
    assert len(VECTORS) >= 50
    weights = {v["weight_pct"] for v in VECTORS}
    assert {0, 5, 25, 50, 100} <= weights
    keys = {v["key"] for v in VECTORS}
    assert "" in keys
    assert any(any(ord(c) > 127 for c in k) for k in keys)
    assert {True, False} <= {v["canary"] for v in VECTORS}


@pytest.mark.parametrize(
    "v", VECTORS, ids=lambda v: f"{v['rollout_id']}|{v['key'][:12]!r}|{v['weight_pct']}")
def test_vector(v):
    digest = hashlib.sha256(f"{v['rollout_id']}:{v['key']}".encode()).digest()
    assert digest[:8].hex() == v["sha256_first8_hex"]
    assert bucket(v["rollout_id"], v["key"]) == v["bucket"]
    assert weight_threshold(v["weight_pct"]) == v["threshold"]
    assert routes_to_canary(v["rollout_id"], v["key"], v["weight_pct"]) is v["canary"]


def test_threshold_rounds_half_up_and_clamps():
    assert weight_threshold(0) == 0
    assert weight_threshold(100) == BUCKETS
    assert weight_threshold(0.125) == 13      # 12.5 buckets: half up, not to even
    assert weight_threshold(0.004) == 0
    assert weight_threshold(5) == 500
    for bad in (-0.1, 100.01, float("nan")):
        with pytest.raises(ValueError):
            weight_threshold(bad)


def test_raising_the_weight_only_adds_keys():
    keys = [f"user-{i}" for i in range(3000)]
    previous: set[str] = set()
    for w in (0, 1, 5, 12.5, 25, 50, 75, 99.99, 100):
        now = {k for k in keys if routes_to_canary("r1", k, w)}
        assert previous <= now
        previous = now
    assert previous == set(keys)


def test_split_is_close_to_the_weight_and_independent_across_rollouts():
    keys = [f"k{i}" for i in range(20000)]
    share = sum(routes_to_canary("rollout-a", k, 25) for k in keys) / len(keys)
    assert abs(share - 0.25) < 0.015   # ~5 standard errors
    a = {k for k in keys if routes_to_canary("rollout-a", k, 25)}
    b = {k for k in keys if routes_to_canary("rollout-b", k, 25)}
    overlap = len(a & b) / len(a)
    assert abs(overlap - 0.25) < 0.03  # another rollout id reshuffles the keys


def test_buckets_are_uniform():
    counts = [0] * 10
    for i in range(20000):
        counts[bucket("u", str(i)) // 1000] += 1
    expected = 2000
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 27.9  # chi2_9 at p = 0.001
