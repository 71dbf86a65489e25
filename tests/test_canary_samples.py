"""Tests for mlx_serving.canary.samples."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from mlx_serving.canary import Arm, Sample, SampleSet
from mlx_serving.canary.samples import StageSamples


def test_sample_is_frozen_and_round_trips():
    s = Sample(Arm.CANARY, ttft_s=0.2, itl_s=None, e2e_s=3.0, error=False, key_bucket=42,
               started_at=10.0)
    with pytest.raises(AttributeError):
        s.ttft_s = 1.0  # type: ignore[misc]
    assert Sample.from_dict(s.to_dict()) == s


def test_counts_errors_and_logs():
    ss = SampleSet(Arm.STABLE)
    ss.extend([Sample(Arm.STABLE, 0.1, 0.01, 1.0), Sample(Arm.STABLE, 0.2, None, 2.0),
               Sample(Arm.STABLE, None, None, None, error=True),
               Sample(Arm.STABLE, 5.0, 0.5, 9.0, error=True),   # failed: latency ignored
               Sample(Arm.STABLE, 0.0, -1.0, float("inf"))])    # invalid values dropped
    assert ss.n == 5 and ss.errors == 2 and ss.error_rate == 0.4
    assert ss.count("ttft") == 2 and ss.count("itl") == 1 and ss.count("e2e") == 2
    assert np.allclose(ss.log_values("ttft"), np.log([0.1, 0.2]))
    with pytest.raises(ValueError):
        ss.log_values("ttft")[0] = 1.0


def test_wrong_arm_is_rejected_and_stage_samples_route():
    ss = SampleSet(Arm.STABLE)
    with pytest.raises(ValueError):
        ss.append(Sample(Arm.CANARY, 0.1))
    both = StageSamples()
    both.add([Sample(Arm.CANARY, 0.1, started_at=5.0), Sample(Arm.STABLE, 0.2, started_at=5.0),
              Sample(Arm.STABLE, 0.3, started_at=1.0)], since=2.0)
    assert both.canary.n == 1 and both.stable.n == 1
    both.reset()
    assert both.canary.n == both.stable.n == 0


def test_running_moments_match_the_values_and_moments_only_sets():
    from mlx_serving.canary.samples import Moments
    rng = np.random.default_rng(1)
    ss = SampleSet(Arm.CANARY)
    chunks = [rng.lognormal(-1.6, 0.5, k) for k in (1, 7, 1000, 3, 20000)]
    for chunk in chunks:
        ss.add_arrays(ttft_s=chunk)
    whole = Moments.of(np.log(np.concatenate(chunks)))
    got = ss.moments("ttft")
    assert got.n == whole.n and got.mean == pytest.approx(whole.mean, rel=1e-12)
    assert got.var == pytest.approx(whole.var, rel=1e-10)
    only = SampleSet(Arm.STABLE)
    only.add_log_moments(n=10, errors=1, ttft=Moments(9, 0.5, 2.0))
    assert only.count("ttft") == 9 and only.errors == 1 and only.quantile("ttft", 0.95) is None
    with pytest.raises(ValueError):
        only.log_values("ttft")


def test_quantile_is_cached_per_version():
    ss = SampleSet("canary")
    ss.add_arrays(ttft_s=np.array([0.1, 0.2, 0.3, 0.4]))
    v = ss.version
    q = ss.quantile("ttft", 0.5)
    assert q == pytest.approx(math.exp(np.quantile(np.log([0.1, 0.2, 0.3, 0.4]), 0.5)))
    ss.add_arrays(ttft_s=np.array([10.0]))
    assert ss.version > v and ss.quantile("ttft", 0.5) == pytest.approx(0.3)
    assert SampleSet("canary").quantile("ttft", 0.95) is None


def test_add_arrays_checks_lengths():
    ss = SampleSet(Arm.CANARY)
    with pytest.raises(ValueError):
        ss.add_arrays(ttft_s=np.ones(3), error=np.zeros(2, bool))
    ss.add_arrays(n=0)
    assert ss.n == 0


def test_hundred_thousand_samples_are_cheap():
    ss = SampleSet(Arm.STABLE)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(100):  # 100 Router batches of 1000
        ss.add_arrays(ttft_s=rng.lognormal(-1.6, 0.5, 1000), itl_s=rng.lognormal(-3.5, 0.3, 1000),
                      e2e_s=rng.lognormal(1.4, 0.4, 1000), error=rng.random(1000) < 0.01)
    assert ss.n == 100_000 and ss.count("ttft") == 100_000 - ss.errors
    assert time.perf_counter() - t0 < 2.0
    batch = [Sample(Arm.STABLE, 0.2, 0.03, 4.0) for _ in range(10_000)]
    t0 = time.perf_counter()
    ss.extend(batch)
    assert time.perf_counter() - t0 < 2.0
