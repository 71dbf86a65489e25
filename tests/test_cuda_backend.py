"""The engine's choices for MLX's GPU backends: attention kernels, prompt padding, where the
replica's engine runs."""

import logging
import os

import mlx.core as mx
import pytest

from mlx_serving.engine import Engine, EngineConfig
from mlx_serving.engine.cuda_backend import (CUDNN_SDPA_ENV, choose_cudnn_attention,
                                             gpu_available, prompt_pad_multiple)


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
