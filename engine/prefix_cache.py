"""Prompt (prefix) KV cache: reuse KV state across requests that share a token prefix.

A thin wrapper over mlx-lm's ``LRUPromptCache`` (a token trie with LRU eviction under a
byte budget) that always leaves at least one prompt token to feed, and counts hits.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0   # prompt tokens served from the cache, summed


class PrefixCache:
    """KV caches of finished sequences, keyed by the tokens they hold."""

    _KEY = "model"  # one PrefixCache per model

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=1 << 30, max_bytes=max_bytes)
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def __len__(self) -> int:
        return len(self._lru)

    def fetch(self, prompt: list[int]) -> tuple[list | None, int]:
        """A private copy of the longest usable cache for ``prompt`` and how many tokens it holds.

        At most ``len(prompt) - 1`` tokens are served, so the model always sees the last
        prompt token and produces the first logits itself.
        """
        if not self.enabled or len(prompt) < 2:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(self._KEY, prompt)
        if cache is not None and not rest:
            if not can_trim_prompt_cache(cache):
                cache = None
            else:
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
        if cache is None:
            self.stats.misses += 1
            return None, 0
        cached = len(prompt) - len(rest)
        self.stats.hits += 1
        self.stats.cached_tokens += cached
        return cache, cached

    def store(self, tokens: list[int], cache: list) -> None:
        """Keep ``cache`` (which holds exactly ``tokens``) for later requests."""
        if self.enabled and tokens and cache:
            # mlx-lm extracts a finished sequence's cache from the batch as lazy slices, which
            # keep the whole batch's KV buffers alive while their nbytes counts one sequence.
            # Evaluated, they hold only their own copy, and the byte budget means what it says.
            mx.eval([c.state for c in cache])
            self._lru.insert_cache(self._KEY, list(tokens), cache)

    def clear(self) -> None:
        self._lru.trim_to(n_sequences=0)
