"""The prefix cache's trie lookup (no model: small KV caches made by hand)."""

from __future__ import annotations

import random

import mlx.core as mx
from mlx_lm.models.cache import KVCache, PromptTrie

from mlx_serving.engine.prefix_cache import PrefixCache, _PrefixTrie


def kv_cache(tokens: int, layers: int = 2) -> list[KVCache]:
    caches = []
    for _ in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.zeros((1, 1, tokens, 4)), mx.zeros((1, 1, tokens, 4)))
        caches.append(c)
    return caches


class CountingNode(dict):
    """A trie node that counts how often it is read."""

    reads = 0

    def __getitem__(self, key):
        CountingNode.reads += 1
        return super().__getitem__(key)

    def __iter__(self):
        CountingNode.reads += 1
        return super().__iter__()


def counting(node: dict) -> CountingNode:
    return CountingNode({k: (counting(v) if isinstance(v, dict) else v)
                         for k, v in node.items()})


def test_lookup_agrees_with_mlx_lms_trie_where_the_answer_is_unique():
    rng = random.Random(0)
    entries = [[1, 2, 3] + [rng.randrange(50) for _ in range(rng.randrange(1, 30))]
               for _ in range(40)] + [[1, 2], [7, 8, 9]]
    ours, theirs = _PrefixTrie(), PromptTrie()
    for tokens in entries:
        ours.add("m", tokens, tuple(tokens))
        theirs.add("m", tokens, tuple(tokens))
    queries = entries + [e[:-1] for e in entries] + [e + [99] for e in entries] + [
        [1, 2, 3, 99], [1, 2, 5], [7, 8], [4], []]
    for q in queries:
        a, b = ours.search("m", q), theirs.search("m", q)
        assert (a.exact, a.shorter, a.common_prefix) == (b.exact, b.shorter, b.common_prefix), q
        assert (a.longer is None) == (b.longer is None), q
        if a.longer is not None:   # any cached sequence through the common prefix serves it
            assert ours.get("m", a.longer) == tuple(a.longer)
            assert a.longer[:a.common_prefix] == q[:a.common_prefix]
            assert len(a.longer) > a.common_prefix or a.longer == a.shorter


def test_a_prompt_sharing_only_a_short_prefix_reads_no_more_than_one_path():
    # Regression: chat prompts share their template's first tokens; mlx-lm looked for the
    # shortest cached sequence below that point by walking every cached sequence, copying
    # the path at each node (time in the square of their lengths, at every admission).
    rng = random.Random(1)
    cache = PrefixCache(max_bytes=1 << 30)
    template = [1, 2942, 201]
    for _ in range(64):
        cache.store(template + [rng.randrange(1000) for _ in range(300)], kv_cache(303))
    cache._lru._trie._trie["model"] = counting(cache._lru._trie._trie["model"])

    prompt = template + [rng.randrange(1000, 2000) for _ in range(137)]
    CountingNode.reads = 0
    served, cached = cache.fetch(prompt)

    assert cached == len(template)
    assert all(c.offset == len(template) for c in served)
    assert CountingNode.reads <= 4 * (len(prompt) + 303), CountingNode.reads  # was ~40,000
