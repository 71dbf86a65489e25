"""The load-time warm-up goes through every change of batch membership that serving makes."""

from __future__ import annotations

from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import BatchKVCache

from mlx_serving.engine import batch as serving_batch
from mlx_serving.engine.config import EngineConfig, ModelConfig
from mlx_serving.engine.model import LoadedModel
from mlx_serving.engine.runner import ModelRunner
from mlx_serving.engine.warmup import warm_up


def test_warm_up_joins_leaves_and_resumes_and_leaves_the_batch_empty(tiny_model_path,
                                                                      monkeypatch):
    # Regression: the warm-up only prefilled and decoded two sequences that ended together.
    # On a fresh CUDA machine the first sequence to leave a running batch (a gather over the
    # rest) compiled a kernel on the engine thread: a 4 s stall under the first traffic.
    calls: dict[str, list] = {"extend": [], "filter": [], "extract_rows": [], "merge": []}

    def spy(cls, name, record):
        original = getattr(cls, name)

        def wrapper(*args, **kwargs):
            calls[name].append(record(*args, **kwargs))
            return original(*args, **kwargs)
        monkeypatch.setattr(cls, name, wrapper)

    spy(GenerationBatch, "extend", lambda self, other: len(other))
    spy(GenerationBatch, "filter", lambda self, keep: len(keep))
    spy(serving_batch, "extract_rows", lambda caches, idxs: idxs)
    spy(BatchKVCache, "merge", lambda caches: max(c.size() for c in caches))

    runner = ModelRunner(LoadedModel(ModelConfig(name="tiny", path=str(tiny_model_path))),
                         EngineConfig())
    try:
        warm_up(runner)
        assert runner.sequences_in_batch() == 0
    finally:
        runner.close()
    assert calls["extend"], "no sequence joined a decoding batch"
    assert any(n > 0 for n in calls["filter"]), "no sequence left a batch that kept running"
    assert calls["extract_rows"], "no sequence's cache was extracted"
    assert any(n > 0 for n in calls["merge"]), "no sequence started from a cache"


def test_an_engine_that_decodes_one_sequence_at_a_time_warms_up(tiny_model_path):
    # Regression: the warm-up waited for two sequences decoding together, which a batch of
    # one never has, and the engine failed to load ("the warm-up generation did not end").
    runner = ModelRunner(LoadedModel(ModelConfig(name="tiny", path=str(tiny_model_path))),
                         EngineConfig(max_batch_size=1, prefill_batch_size=1))
    try:
        warm_up(runner)
        assert runner.sequences_in_batch() == 0
    finally:
        runner.close()
