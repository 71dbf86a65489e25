"""One loaded model and its continuous batch (mlx-lm's BatchGenerator).

Used only from the engine thread. The runner hides BatchGenerator's uids and cache
handling: sequences go in, pause, resume and leave; caches of leaving sequences feed the
prefix cache.
"""

from __future__ import annotations

from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import trim_prompt_cache

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.model import LoadedModel
from mlx_serving.engine.prefix_cache import PrefixCache
from mlx_serving.engine.sampling import logits_processors_for, sampler_for
from mlx_serving.engine.sequence import Sequence, SequenceStatus


class ModelRunner:
    """A model, its BatchGenerator and its prefix cache."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.loaded = loaded
        self._config = config
        self.prefix_cache = PrefixCache(config.prompt_cache_bytes)
        self.by_uid: dict[int, Sequence] = {}
        self._eos_stops = StopSequences([(t,) for t in loaded.eos_token_ids])
        self._retired_times = (0.0, 0.0)  # prefill and decode seconds of replaced batches
        self.batch = self._new_batch()

    def _new_batch(self) -> BatchGenerator:
        cfg = self._config
        return BatchGenerator(
            self.loaded.model,
            completion_batch_size=cfg.max_batch_size,
            prefill_batch_size=cfg.prefill_batch_size,
            prefill_step_size=cfg.prefill_step_size,
        )

    def reset(self) -> list[Sequence]:
        """Drop the batch (after an MLX failure); returns the sequences that were in it."""
        lost = list(self.by_uid.values())
        self.by_uid.clear()
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
        """Sequences BatchGenerator itself holds (queued, prefilling or decoding).

        Reads mlx-lm internals on purpose: it checks the real batch, not our bookkeeping.
        """
        b = self.batch
        return len(b._unprocessed_sequences) + len(b._prompt_batch) + len(b._generation_batch)

    def batch_times(self) -> tuple[float, float]:
        """Seconds BatchGenerator has spent in prompt processing and in decode steps.

        Reads mlx-lm's running counters (its public ``stats()`` only measures a window).
        """
        c = self.batch._counters
        prefill, decode = self._retired_times
        return prefill + c.prompt_time, decode + c.decode_time

    def _stops_for(self, seq: Sequence) -> StopSequences:
        params = seq.params
        if not params.stop_token_ids and not params.ignore_eos:
            return self._eos_stops
        ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            ids.extend(self.loaded.eos_token_ids)
        return StopSequences([(t,) for t in ids])

    def _insert(self, seq: Sequence, prompt: list[int], cache, context: list[int]) -> None:
        (uid,) = self.batch.insert(
            [prompt],
            max_tokens=[seq.remaining_tokens],
            caches=[cache],
            all_tokens=[context],
            samplers=[sampler_for(seq.params, len(seq.generated))],
            logits_processors=[logits_processors_for(seq.params)],
            stop_sequences=[self._stops_for(seq)],
        )
        seq.uid = uid
        seq.status = SequenceStatus.RUNNING
        self.by_uid[uid] = seq

    def start(self, seq: Sequence) -> None:
        """Put a newly admitted sequence into the batch, reusing a cached prefix if any."""
        cache, cached = self.prefix_cache.fetch(seq.prompt_ids)
        seq.cached_tokens = cached
        self._insert(seq, seq.prompt_ids[cached:], cache, seq.prompt_ids[:cached])

    def remove(self, seq: Sequence, *, to_prefix_cache: bool = True) -> list | None:
        """Take a running sequence out of the batch; returns its KV cache if it was decoding.

        The cache holds every token fed so far, the last generated one included. Unless the
        caller keeps using it, it is offered to the prefix cache.
        """
        uid = seq.uid
        self.by_uid.pop(uid, None)
        seq.uid = None
        decoding = seq.first_token_at is not None
        extracted = self.batch.remove([uid], return_prompt_caches=decoding)
        if not decoding or uid not in extracted:
            return None
        cache, tokens = extracted[uid]
        if to_prefix_cache:
            self.prefix_cache.store(tokens, cache)
        return cache

    def finished(self, uid: int, tokens: list[int] | None, cache: list | None) -> None:
        """Forget a sequence BatchGenerator ended itself (EOS, stop token, max_tokens)."""
        self.by_uid.pop(uid, None)
        if tokens and cache:
            self.prefix_cache.store(tokens, cache)

    def pause(self, seq: Sequence) -> None:
        """Move a decoding sequence out of the batch, keeping its KV cache for ``resume``.

        BatchGenerator samples one token ahead; that token is thrown away here, so the cache
        is trimmed by one and the last token is fed again on resume (the seeded sampler
        derives its key from the token index, so the redrawn token is the same).
        """
        cache = self.remove(seq, to_prefix_cache=False)
        trim_prompt_cache(cache, 1)
        seq.paused_cache = cache
        seq.status = SequenceStatus.PAUSED

    def resume(self, seq: Sequence) -> None:
        context = seq.prompt_ids + seq.generated[:-1]
        cache, seq.paused_cache = seq.paused_cache, None
        self._insert(seq, seq.generated[-1:], cache, context)
