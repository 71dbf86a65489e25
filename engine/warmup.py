"""Warm a model up at load time so the first real request pays no compile or allocation cost."""

from __future__ import annotations

from mlx_serving.engine.runner import ModelRunner

_PROMPTS = ([1, 2, 3, 4, 5, 6, 7, 8], [3, 2, 1])  # two lengths: exercises padding and batching
_TOKENS = 4


def warm_up(runner: ModelRunner) -> None:
    """Prefill and decode a small batch through the runner's own BatchGenerator."""
    batch = runner.batch
    uids = set(batch.insert([list(p) for p in _PROMPTS], max_tokens=[_TOKENS] * len(_PROMPTS)))
    while uids:
        _, responses = batch.next()
        uids -= {r.uid for r in responses if r.finish_reason is not None}
