"""Sticky traffic split: a stable hash of (rollout id, key) into 10,000 buckets.

The rule, reproducible in any language:

1. ``data = UTF-8 bytes of f"{rollout_id}:{key}"`` (``:`` is U+003A; no normalisation of the
   key: callers pass the exact string they want to stick on, e.g. a user id or session id).
2. ``digest = SHA-256(data)``; take its first 8 bytes as a big-endian unsigned 64-bit integer.
3. ``bucket = that integer mod 10000`` (0 .. 9999).
4. A key goes to the canary while ``bucket < threshold(weight)`` where
   ``threshold(weight) = floor(weight * 100 + 0.5)`` (weight in percent, 0..100, rounded half
   up to a whole number of buckets; Python's ``round`` rounds ties to even, so it is not used).

Because the threshold only grows with the weight, raising the weight only adds keys to the
canary: a user who saw the canary at 5% still sees it at 25%. ``tests/data/canary/
bucketing_vectors.json`` holds shared test vectors for other implementations (router, CLI).
"""

from __future__ import annotations

import hashlib
import math

BUCKETS = 10_000


def bucket(rollout_id: str, key: str) -> int:
    """The bucket (0..9999) of ``key`` within rollout ``rollout_id``."""
    digest = hashlib.sha256(f"{rollout_id}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def weight_threshold(weight_pct: float) -> int:
    """Number of buckets (0..10000) that go to the canary at ``weight_pct`` percent."""
    if not isinstance(weight_pct, (int, float)) or math.isnan(weight_pct):
        raise ValueError(f"weight must be a number, got {weight_pct!r}")
    if not 0.0 <= weight_pct <= 100.0:
        raise ValueError(f"weight must lie in [0, 100] percent, got {weight_pct}")
    return min(BUCKETS, int(math.floor(weight_pct * 100.0 + 0.5)))


def routes_to_canary(rollout_id: str, key: str, weight_pct: float) -> bool:
    """True when ``key`` is served by the canary at canary weight ``weight_pct`` (percent)."""
    return bucket(rollout_id, key) < weight_threshold(weight_pct)
