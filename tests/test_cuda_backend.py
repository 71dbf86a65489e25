"""The engine's choices for MLX's GPU backends: attention kernels, prompt padding, MLX's
cache of freed buffers, where the replica's engine runs."""

import logging
import os

import mlx.core as mx
import pytest

from mlx_serving.engine import Engine, EngineConfig
from mlx_serving.engine.cuda_backend import (CUDNN_SDPA_ENV, choose_cudnn_attention,
                                             gpu_available, prompt_pad_multiple,
                                             set_cache_limit)


@pytest.mark.parametrize("enabled, value", [(False, "0"), (True, "1")])
def test_the_setting_reaches_mlx_through_its_environment_variable(monkeypatch, enabled, value):
    monkeypatch.delenv(CUDNN_SDPA_ENV, raising=False)
    assert choose_cudnn_attention(enabled) is enabled
    assert os.environ[CUDNN_SDPA_ENV] == value


def test_the_operators_environment_wins_and_the_conflict_is_logged(monkeypatch, caplog):
    monkeypatch.setenv(CUDNN_SDPA_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="mlx_serving.engine.cuda_backend"):
        assert choose_cudnn_attention(False) is True
    assert os.environ[CUDNN_SDPA_ENV] == "1"
    assert "overrides the engine setting cudnn_attention=False" in caplog.text


def test_an_engine_turns_cudnn_attention_off_by_default(monkeypatch):
    monkeypatch.delenv(CUDNN_SDPA_ENV, raising=False)
    engine = Engine(EngineConfig())
    try:
        assert os.environ[CUDNN_SDPA_ENV] == "0"
    finally:
        engine.shutdown()


def test_prompt_padding_defaults_to_the_backend():
    # padding only pays where a new prompt-pass shape costs a build (CUDA)
    assert prompt_pad_multiple(None) == (32 if mx.cuda.is_available() else 1)
    assert prompt_pad_multiple(5) == 5


def test_gpu_available_matches_the_default_device():
    # decides whether a replica's engine runs in a child process by default
    assert gpu_available() == (mx.default_device() == mx.gpu)


@pytest.fixture
def mlx_cache_limit():
    """Restores MLX's cache limit after the test; yields the limit in force before it."""
    before = mx.set_cache_limit(2**62)
    mx.set_cache_limit(before)
    yield before
    mx.set_cache_limit(before)


def test_the_cache_limit_defaults_to_a_tenth_of_the_gpu_on_cuda_only(mlx_cache_limit):
    # MLX's own bound on CUDA let a served 8B model's engine fill an 80 GB H100 until its
    # allocations failed (docs/BENCHMARKS.md, run 15)
    limit = set_cache_limit(None, device_memory=80 * 2**30)
    if mx.cuda.is_available():
        assert limit == 8 * 2**30 and mx.set_cache_limit(mlx_cache_limit) == 8 * 2**30
    else:
        assert limit is None and mx.set_cache_limit(mlx_cache_limit) == mlx_cache_limit


def test_a_configured_cache_limit_reaches_mlx_and_its_stats(mlx_cache_limit):
    engine = Engine(EngineConfig(mlx_cache_limit_bytes=3 * 2**20))
    try:
        assert mx.set_cache_limit(3 * 2**20) == 3 * 2**20
        assert engine.stats().cache_memory_bytes == mx.get_cache_memory()
    finally:
        engine.shutdown()
