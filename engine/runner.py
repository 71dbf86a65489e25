"""One loaded model and its continuous batch (mlx-lm's BatchGenerator, with the cheaper
joins of ``engine.batch``).

Used only from the engine thread. The runner hides BatchGenerator's uids and cache
handling: sequences go in, pause, resume and leave; caches of leaving sequences feed the
prefix cache.

Sequences that finish are *retired*, not removed: the scheduler decides when a sequence
ends (stop tokens, max_tokens), delivers its last token at once, and the runner releases
the slots of retired sequences together (``release_retired``), when new ones are about to
join or after a few steps. Each change of the batch's membership costs a filter of every
layer's KV cache, a cache extraction per sequence and host syncs that stall the decode
pipeline; BatchGenerator would pay them once per finishing sequence. Until released, a
retired sequence keeps its slot and its garbage tokens are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mlx_serving.engine import fd_limits  # noqa: F401  isort: skip  (before mlx-lm)
from mlx_lm.generate import StopSequences
from mlx_lm.models.cache import trim_prompt_cache

from mlx_serving.engine.batch import ServingBatchGenerator
from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.cuda_backend import prompt_pad_multiple
from mlx_serving.engine.model import LoadedModel
from mlx_serving.engine.prefix_cache import PrefixCache
from mlx_serving.engine.sampling import logits_processors_for, sampler_for
from mlx_serving.engine.sequence import Sequence, SequenceStatus


# BatchGenerator never ends a sequence itself: no stop tokens, and max_tokens beyond the
# request's by more steps than a retired sequence may wait for its release.
_NO_STOPS = StopSequences()


@dataclass
class HostTimes:
    """Seconds the engine thread spent changing the batch's membership."""

    admit_s: float = 0.0    # prefix-cache lookups and inserts (new and resumed sequences)
    release_s: float = 0.0  # removals: cache extraction, the batch's filter, prefix-cache stores
    join_s: float = 0.0     # BatchGenerator steps outside mlx-lm's prompt and decode timers:
                            # prefilled sequences joining the decode batch (the merge of
                            # their caches)


@dataclass
class _Retired:
    tokens: list[int]   # the tokens its KV cache holds that belong to the request
    since_step: int


class ModelRunner:
    """A model, its BatchGenerator and its prefix cache."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.loaded = loaded
        self._config = config
        self.prefix_cache = PrefixCache(config.prompt_cache_bytes)
        self.by_uid: dict[int, Sequence] = {}
        self._retired: dict[int, _Retired] = {}
        self._eos_ids = frozenset(loaded.eos_token_ids)
        self._max_tokens_slack = config.prefill_wait_steps + 2
        self._retired_times = (0.0, 0.0)  # prefill and decode seconds of replaced batches
        self.host_times = HostTimes()
        self.batch = self._new_batch()

    def _new_batch(self) -> ServingBatchGenerator:
        cfg = self._config
        return ServingBatchGenerator(
            self.loaded.model,
            completion_batch_size=cfg.max_batch_size,
            prefill_batch_size=cfg.prefill_batch_size,
            prefill_step_size=cfg.prefill_step_size,
            prompt_pad_multiple=prompt_pad_multiple(cfg.prompt_pad_multiple),
        )

    def reset(self) -> list[Sequence]:
        """Drop the batch (after an MLX failure); returns the sequences that were in it."""
        lost = list(self.by_uid.values())
        self.by_uid.clear()
        self._retired.clear()
        self._retired_times = self.batch_times()
        self.batch.close()
        self.batch = self._new_batch()
        return lost

    def close(self) -> None:
        self.batch.close()
        self.prefix_cache.clear()

    @property
    def num_running(self) -> int:
        return len(self.by_uid)

    def sequences_in_batch(self) -> int:
        """Sequences BatchGenerator itself holds (queued, prefilling, decoding or retired).

        Reads mlx-lm internals on purpose: it checks the real batch, not our bookkeeping.
        """
        b = self.batch
        return len(b._unprocessed_sequences) + len(b._prompt_batch) + len(b._generation_batch)

    def step(self):
        """One BatchGenerator step: ``(prompt_responses, generation_responses)``."""
        timed = sum(self.batch_times())
        started = time.perf_counter()
        try:
            return self.batch.next()
        finally:
            spent = time.perf_counter() - started
            self.host_times.join_s += max(0.0, spent - (sum(self.batch_times()) - timed))

    def batch_times(self) -> tuple[float, float]:
        """Seconds BatchGenerator has spent in prompt processing and in decode steps.

        Reads mlx-lm's running counters (its public ``stats()`` only measures a window).
        """
        c = self.batch._counters
        prefill, decode = self._retired_times
        return prefill + c.prompt_time, decode + c.decode_time

    def is_stop_token(self, seq: Sequence, token: int) -> bool:
        """Whether ``token`` ends ``seq``: one of its stop_token_ids, or EOS unless it
        ignores EOS."""
        params = seq.params
        return token in params.stop_token_ids or (not params.ignore_eos and token in self._eos_ids)

    def _insert(self, seq: Sequence, prompt: list[int], cache, context: list[int]) -> None:
        (uid,) = self.batch.insert(
            [prompt],
            max_tokens=[seq.remaining_tokens + self._max_tokens_slack],
            caches=[cache],
            all_tokens=[context],
            samplers=[sampler_for(seq.params, len(seq.generated))],
            logits_processors=[logits_processors_for(seq.params)],
            stop_sequences=[_NO_STOPS],
        )
        seq.uid = uid
        seq.status = SequenceStatus.RUNNING
        self.by_uid[uid] = seq

    def start(self, seq: Sequence) -> None:
        """Put a newly admitted sequence into the batch, reusing a cached prefix if any."""
        started = time.perf_counter()
        cache, cached = self.prefix_cache.fetch(seq.prompt_ids)
        seq.cached_tokens = cached
        self._insert(seq, seq.prompt_ids[cached:], cache, seq.prompt_ids[:cached])
        self.host_times.admit_s += time.perf_counter() - started

    def remove(self, seq: Sequence, *, to_prefix_cache: bool = True):
        """Take a running sequence out of the batch.

        Returns ``(cache, tokens)`` if it was decoding, else None: its KV cache and the
        tokens that cache holds, every token fed so far (a sequence that just joined has
        not been fed its last input token yet). Unless the caller keeps using it, the
        cache is offered to the prefix cache. If no live sequence is left, the retired
        ones leave with it: the engine thread steps only batches with live sequences, and
        nothing else would release them.
        """
        started = time.perf_counter()
        uid = seq.uid
        decoding = seq.first_token_at is not None
        extracted = self.batch.remove([uid], return_prompt_caches=decoding).get(uid)
        if extracted is not None and to_prefix_cache:
            cache, tokens = extracted
            self.prefix_cache.store(tokens, cache)
        self.host_times.release_s += time.perf_counter() - started
        if self.by_uid.keys() == {uid}:
            self.release_retired()
        # the books change after the batch: ``stats()``, read from other threads, never
        # counts a sequence as gone while the batch still holds it
        self.by_uid.pop(uid, None)
        seq.uid = None
        return extracted

    def retire(self, seq: Sequence, step: int) -> None:
        """A finished sequence leaves the books now and the batch at the next release.

        Its KV cache holds the prompt and every generated token (the last one was fed to
        the step that returned it); the tokens generated after it are garbage.
        """
        uid = seq.uid
        self.by_uid.pop(uid, None)
        seq.uid = None
        self._retired[uid] = _Retired(seq.prompt_ids + seq.generated, step)

    def release_due(self, step: int, max_wait_steps: int) -> None:
        """Release the retired sequences if nothing live is left in the batch, or once the
        longest-waiting one has waited ``max_wait_steps`` steps for a join to share."""
        if not self._retired:
            return
        oldest = next(iter(self._retired.values()))   # retired in step order
        if not self.by_uid or step - oldest.since_step >= max_wait_steps:
            self.release_retired()

    def release_retired(self) -> None:
        """Take every retired sequence out of the batch (one filter of the batch), their
        caches, cut back to the request's own tokens, to the prefix cache."""
        if not self._retired:
            return
        started = time.perf_counter()
        retired, self._retired = self._retired, {}
        extracted = self.batch.remove(list(retired), return_prompt_caches=self.prefix_cache.enabled)
        for uid, (cache, tokens) in extracted.items():
            kept = retired[uid].tokens
            excess = len(tokens) - len(kept)
            if excess < 0:
                continue
            if excess:
                trim_prompt_cache(cache, excess)
            self.prefix_cache.store(kept, cache)
        self.host_times.release_s += time.perf_counter() - started

    def pause(self, seq: Sequence) -> None:
        """Move a decoding sequence out of the batch, keeping its KV cache for ``resume``.

        BatchGenerator samples one token ahead; that token is thrown away here, so the cache
        is cut back to the tokens before the last generated one, which is fed again on
        resume (the seeded sampler derives its key from the token index, so the redrawn
        token is the same).
        """
        cache, tokens = self.remove(seq, to_prefix_cache=False)
        excess = len(tokens) - (len(seq.prompt_ids) + len(seq.generated) - 1)
        if excess:
            trim_prompt_cache(cache, excess)
        seq.paused_cache = cache
        seq.status = SequenceStatus.PAUSED

    def resume(self, seq: Sequence) -> None:
        started = time.perf_counter()
        context = seq.prompt_ids + seq.generated[:-1]
        cache, seq.paused_cache = seq.paused_cache, None
        self._insert(seq, seq.generated[-1:], cache, context)
        self.host_times.admit_s += time.perf_counter() - started
