"""Warm a model up at load time so the first real request pays no compile or allocation cost.

MLX's CUDA backend compiles many kernels on first use (NVRTC, cached on disk under
``MLX_PTX_CACHE_DIR``, by default in the temp directory): on a fresh machine each new kernel
costs up to seconds on the engine thread. So the warm-up goes through every change of the
batch's membership that serving makes, not only a prefill and a few steps: sequences joining
a decoding batch, one leaving with its KV cache extracted (as for the prefix cache), one
starting from such a cache, and a sampling sampler beside the greedy one.
"""

from __future__ import annotations

from mlx_serving.engine.params import SamplingParams
from mlx_serving.engine.runner import ModelRunner
from mlx_serving.engine.sampling import sampler_for

_TOKENS = 8


def warm_up(runner: ModelRunner) -> None:
    """Drive the runner's own BatchGenerator through prefill, decode, a join, a leave with
    the cache extracted and a start from that cache; returns with the batch empty."""
    batch = runner.batch
    vocab = runner.loaded.vocab_size

    def prompt(n: int, start: int) -> list[int]:
        return [(start + i) % (vocab - 1) + 1 for i in range(n)]

    def step_until(done) -> None:
        for _ in range(8 * _TOKENS):   # a bound well above the few steps each phase takes
            if done():
                return
            batch.next()
        raise RuntimeError("the warm-up generation did not end")

    def decoding() -> int:
        return len(batch._generation_batch)

    # Two lengths (padding) prefilled together, then decoding; one where the engine decodes
    # a single sequence at a time.
    width = min(2, batch.completion_batch_size)
    starts = [(prompt(24, 1), _TOKENS), (prompt(3, 7), 2 * _TOKENS)][-width:]
    short = batch.insert([p for p, _ in starts], max_tokens=[m for _, m in starts])[-1]
    step_until(lambda: decoding() == width)
    if batch.completion_batch_size > width:
        # A join while the batch decodes, with a sampling sampler (the one the engine would
        # give a request) beside the greedy ones.
        sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=min(8, vocab - 1))
        batch.insert([prompt(5, 11)], max_tokens=[_TOKENS], samplers=[sampler_for(sampled)])
        step_until(lambda: decoding() == width + 1)
    # One leaves with its cache extracted (a finished sequence's gift to the prefix cache),
    # and a new one starts from that cache.
    cache, tokens = batch.remove([short], return_prompt_caches=True)[short]
    batch.insert([prompt(2, 13)], max_tokens=[_TOKENS], caches=[cache], all_tokens=[tokens])
    step_until(lambda: runner.sequences_in_batch() == 0)
