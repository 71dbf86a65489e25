"""Per-request samplers and logits processors for mlx-lm's BatchGenerator.

BatchGenerator samples all rows in one call when every row shares the same sampler
object, so unseeded samplers are shared between requests with equal settings. A seeded
sampler draws token i with a key derived from (seed, i) alone, so the same seed gives the
same tokens whether the request runs alone, inside a batch, or is paused and resumed.
"""

from __future__ import annotations

import functools
import hashlib

from mlx_serving.engine import fd_limits  # noqa: F401  isort: skip  (before mlx-lm)
import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
    make_sampler,
)

from mlx_serving.engine.outputs import TokenLogprob
from mlx_serving.engine.params import SamplingParams


def sampler_for(params: SamplingParams, start_index: int = 0):
    """The sampler for one request; ``start_index`` is the index of its next token."""
    if params.greedy:
        return greedy_sampler
    if params.seed is None:
        return _shared_sampler(params.temperature, params.top_p, params.min_p, params.top_k)
    return SeededSampler(params, start_index)


@functools.lru_cache(maxsize=256)
def _shared_sampler(temperature: float, top_p: float, min_p: float, top_k: int):
    return make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)


class SeededSampler:
    """Samples token i of a request with a key derived from (seed, i)."""

    def __init__(self, params: SamplingParams, start_index: int = 0):
        self._seed = params.seed
        self._index = start_index
        self._inv_temp = 1.0 / params.temperature
        self._filters = []
        if params.top_p < 1.0:
            self._filters.append(lambda x: apply_top_p(x, params.top_p))
        if params.min_p > 0.0:
            self._filters.append(lambda x: apply_min_p(x, params.min_p))
        if params.top_k > 0:
            self._filters.append(lambda x: apply_top_k(x, params.top_k))

    def __call__(self, logprobs: mx.array) -> mx.array:
        digest = hashlib.blake2b(f"{self._seed}:{self._index}".encode(), digest_size=8).digest()
        key = mx.random.key(int.from_bytes(digest, "little") >> 1)
        self._index += 1
        for keep in self._filters:
            logprobs = keep(logprobs)
        return mx.random.categorical(logprobs * self._inv_temp, key=key)


def logits_processors_for(params: SamplingParams) -> list:
    """mlx-lm logits processors for the request's penalties and logit bias (often none)."""
    if not params.has_penalties:
        return []
    n = params.penalty_context_size
    return make_logits_processors(
        logit_bias=params.logit_bias,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        repetition_context_size=n,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=n,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=n,
    )


def token_logprob(logprobs: mx.array, token: int, top_n: int) -> TokenLogprob:
    """Log-probability of ``token`` in a (vocab,) log-softmax row, plus the ``top_n`` best."""
    if top_n == 0:
        return TokenLogprob(token, logprobs[token].item())
    top_ids = mx.argpartition(-logprobs, top_n - 1)[:top_n]
    top_vals = logprobs[top_ids]
    chosen = logprobs[token]
    mx.eval(top_ids, top_vals, chosen)
    top = sorted(zip(top_ids.tolist(), top_vals.tolist()), key=lambda p: -p[1])
    return TokenLogprob(token, chosen.item(), top)
