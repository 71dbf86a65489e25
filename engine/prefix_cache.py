"""Prompt (prefix) KV cache: reuse KV state across requests that share a token prefix.

A thin wrapper over mlx-lm's ``LRUPromptCache`` (a token trie with LRU eviction under a
byte budget) that always leaves at least one prompt token to feed, and counts hits.

Its trie's lookup is replaced (``_PrefixTrie``): where a prompt leaves the trie partway
along cached sequences, mlx-lm searches the whole subtree below that point for the
shortest one, copying the path at every node. That costs time in the square of the cached
sequences' lengths on every admission, on the engine thread: chat prompts all share their
template's first tokens, so every request paid it (milliseconds per request with a few
dozen cached sequences: a third of the served throughput on an H100 at 32 streams).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_serving.engine import fd_limits  # noqa: F401  isort: skip  (before mlx-lm)
import mlx.core as mx
from mlx_lm.models.cache import (LRUPromptCache, PromptTrie, PromptTrieResult,
                                 can_trim_prompt_cache, trim_prompt_cache)


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0   # prompt tokens served from the cache, summed


_VALUE = "__value__"   # where mlx-lm's trie keeps a node's entry


class _PrefixTrie(PromptTrie):
    """mlx-lm's token trie with a lookup in time linear in the tokens walked.

    Where the prompt leaves the trie below cached sequences, any one of them serves the
    common prefix (trimmed to it, its KV state is the prefix's): the first found going
    down is taken, not the shortest.
    """

    def search(self, model, tokens: list[int]) -> PromptTrieResult:
        node = self._trie.get(model)
        if node is None:
            return PromptTrieResult(model, None, None, None, 0)
        if not tokens and _VALUE in node:
            return PromptTrieResult(model, [], None, None, 0)
        last, index = -1, 0
        while index < len(tokens) and tokens[index] in node:
            node = node[tokens[index]]
            if _VALUE in node:
                last = index
            index += 1
        if last == len(tokens) - 1 >= 0:
            return PromptTrieResult(model, tokens, None, None, 0)
        shorter = tokens[:last + 1] if last > 0 else None
        longer = None
        if index > 0:
            below = []
            while _VALUE not in node:   # every leaf holds an entry: the walk ends at one
                token = next(iter(node))
                below.append(token)
                node = node[token]
            longer = tokens[:index] + below
        return PromptTrieResult(model, None, shorter, longer, index)


class PrefixCache:
    """KV caches of finished sequences, keyed by the tokens they hold."""

    _KEY = "model"  # one PrefixCache per model

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=1 << 30, max_bytes=max_bytes)
        self._lru._trie = _PrefixTrie()
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
            # Asynchronously: they depend on the decode step in flight, which a synchronous
            # eval would wait for, with the engine thread unable to queue the next one.
            mx.async_eval([c.state for c in cache])
            self._lru.insert_cache(self._KEY, list(tokens), cache)

    def clear(self) -> None:
        self._lru.trim_to(n_sequences=0)
