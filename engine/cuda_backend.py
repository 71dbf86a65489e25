"""Choices the engine and its replicas make for MLX's GPU backends, CUDA's above all.

MLX runs prompt-pass attention on CUDA through cuDNN's fused kernel and builds one cuDNN
graph per distinct shape (batch size, prompt length, mask, strides): 60–130 ms on an H100's
engine thread each time a new shape appears. A served engine sees a new (batch, length)
pair at nearly every prompt pass, so it keeps paying for graphs. MLX's own attention kernels
were as fast or faster for batched prompt passes (docs/BENCHMARKS.md, run 7), but a prompt
pass of a new shape still costs 5–30 ms more on first use (run 10), hence the padding of
prompts to a multiple of a few tokens. On Metal and CPU only ``gpu_available`` applies.
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx

log = logging.getLogger(__name__)

CUDNN_SDPA_ENV = "MLX_CUDA_USE_CUDNN_SDPA"
CUDA_PROMPT_PAD_MULTIPLE = 32


def gpu_available() -> bool:
    """Whether MLX runs on a GPU here (CUDA or Metal), without creating a device context."""
    return mx.cuda.is_available() or mx.metal.is_available()


def prompt_pad_multiple(configured: int | None) -> int:
    """The multiple prompt passes pad to: ``configured``, else 32 on MLX's CUDA backend
    (fewer distinct prompt-pass shapes, each costing a build on first use) and 1 elsewhere."""
    if configured is not None:
        return configured
    return CUDA_PROMPT_PAD_MULTIPLE if mx.cuda.is_available() else 1


def set_cache_limit(configured: int | None, device_memory: int) -> int | None:
    """Bound MLX's cache of freed buffers; returns the limit set, or None for MLX's default.

    ``configured``, else a tenth of ``device_memory`` on MLX's CUDA backend. There MLX's own
    bound is its memory limit (75 of an H100's 80 GiB): a long-running engine, whose batches
    and KV caches change shape every few steps, keeps that much in freed buffers, and CUDA's
    pools, kernels and the replica's other process have to fit in the rest. On Metal and CPU
    the cache lives in the machine's memory and MLX's default stands.
    """
    if configured is None and not mx.cuda.is_available():
        return None
    limit = configured if configured is not None else device_memory // 10
    mx.set_cache_limit(limit)
    return limit


def choose_cudnn_attention(enabled: bool) -> bool:
    """Tell MLX whether to use cuDNN's fused attention; returns the choice in force.

    MLX reads ``MLX_CUDA_USE_CUDNN_SDPA`` once per process, at its first attention call on
    the GPU, so this must run before any model does. A value already in the environment
    (the operator's) wins over ``enabled``.
    """
    wanted = "1" if enabled else "0"
    current = os.environ.get(CUDNN_SDPA_ENV)
    if current is None:
        os.environ[CUDNN_SDPA_ENV] = wanted
        return enabled
    if current != wanted:
        log.warning("%s=%s is set in the environment; it overrides the engine setting "
                    "cudnn_attention=%s", CUDNN_SDPA_ENV, current, enabled)
    return current != "0"
