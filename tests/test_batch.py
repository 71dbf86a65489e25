"""Joining sequences ride the batch's next decode step: same tokens, fewer forward passes."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch

from mlx_serving.engine.batch import ServingBatchGenerator, extract_rows, filter_rows
from mlx_serving.engine.config import EngineConfig, ModelConfig
from mlx_serving.engine.model import LoadedModel
from mlx_serving.engine.params import GenerationRequest, SamplingParams
from mlx_serving.engine.runner import ModelRunner
from mlx_serving.engine.sequence import Sequence

PROMPTS = [[5, 9, 13, 2, 7, 30], [11, 4], [8, 8, 21, 3, 17], [40, 2, 6, 19]]
TOKENS = 12


class CountingModel:
    """The model, counting its forward passes."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.fixture(scope="module")
def loaded(tiny_model_path):
    return LoadedModel(ModelConfig(name="tiny", path=str(tiny_model_path)))


# step -> prompts inserted before it
SPACED = {0: PROMPTS[:2], 3: PROMPTS[2:3], 5: PROMPTS[3:]}  # three groups join, apart
BACK_TO_BACK = {0: PROMPTS[:1], 1: PROMPTS[1:2], 2: PROMPTS[2:3], 6: PROMPTS[3:]}  # four groups;
# each of the first three arrives on the step the one before it finishes its prompt pass


def generate_staggered(cls, model, arrivals=SPACED,
                       **kwargs) -> tuple[dict[int, list[int]], dict[int, list[float]]]:
    """Sequences arrive at the steps ``arrivals`` names, joining a decoding batch."""
    batch = cls(model, completion_batch_size=8, prefill_batch_size=2, **kwargs)
    tokens: dict[int, list[int]] = {}
    logprobs: dict[int, list[float]] = {}
    for step in range(60):
        for prompt_ids in arrivals.get(step, []):
            (uid,) = batch.insert([prompt_ids], max_tokens=[TOKENS])
            tokens[uid], logprobs[uid] = [], []
        for r in batch.next()[1]:
            tokens[r.uid].append(r.token)
            logprobs[r.uid].append(r.logprobs[r.token].item())
    batch.close()
    return tokens, logprobs


@pytest.mark.parametrize("pad_multiple", [1, 8])
@pytest.mark.parametrize("arrivals, joins", [(SPACED, 3), (BACK_TO_BACK, 4)],
                         ids=["spaced", "back-to-back"])
def test_joins_give_batch_generators_tokens_and_logprobs_with_fewer_forward_passes(
        loaded, pad_multiple, arrivals, joins, monkeypatch):
    reference = CountingModel(loaded.model)
    ref_tokens, ref_logprobs = generate_staggered(BatchGenerator, reference, arrivals)
    copies = []
    monkeypatch.setattr(PromptProcessingBatch, "_copy",
                        lambda batch: copies.append(batch) or pytest.fail("copied"))
    ours = CountingModel(loaded.model)
    # padded prompts: their padding, moved left of each row, is masked out
    tokens, logprobs = generate_staggered(ServingBatchGenerator, ours, arrivals,
                                          prompt_pad_multiple=pad_multiple)

    assert all(len(t) == TOKENS for t in ref_tokens.values())
    assert tokens == ref_tokens   # the echoes of the fed tokens are left out
    for uid in ref_logprobs:
        assert logprobs[uid] == pytest.approx(ref_logprobs[uid], abs=1e-4)
    # BatchGenerator runs a forward pass of its own for each group that joins; the last
    # group's tokens come one decode step later, so the batch decodes once more
    assert ours.calls == reference.calls - joins + 1
    # a finished prompt batch moves to decoding whole, even when a new prompt arrives on
    # that step (mlx-lm would split it apart, copying its caches)
    assert not copies


def staggered_caches(loaded, rows: int = 3) -> list:
    """Every layer's BatchKVCache of ``rows`` prompts of different lengths, prefilled
    together (so each row has its own left padding), then decoded two steps."""
    batch = BatchGenerator(loaded.model, completion_batch_size=8, prefill_batch_size=rows)
    batch.insert(PROMPTS[:rows], max_tokens=[TOKENS] * rows)
    for _ in range(4):
        batch.next()
    caches = batch._generation_batch.prompt_cache
    mx.eval([c.state for c in caches])
    return caches


def cache_state(c) -> tuple:
    return (c._idx, c.offset.tolist(), c.left_padding.tolist(),
            None if c.keys is None else (c.keys.tolist(), c.values.tolist()))


@pytest.mark.parametrize("keep", [[1, 2], [0], [2, 0], []])
def test_filter_rows_leaves_every_layer_as_batch_kv_cache_filter_does(loaded, keep):
    # [1, 2] drops the row of the longest prompt, so the padding the others share is cut
    ours, reference = staggered_caches(loaded), staggered_caches(loaded)
    filtered = filter_rows(ours, keep)
    assert filtered is ours
    if not keep:   # what GenerationBatch.filter does then
        assert ours == []
        return
    for c in reference:
        c.filter(keep)
    assert [cache_state(c) for c in ours] == [cache_state(c) for c in reference]


def _row_state(caches: list) -> list:
    return [(c.offset, c.keys.tolist(), c.values.tolist()) for c in caches]


@pytest.mark.parametrize("idxs", [[0], [1], [2], [2, 0], [0, 1, 2]])
def test_extract_rows_gives_batch_kv_cache_extracts_of_every_layer(loaded, idxs):
    caches = staggered_caches(loaded)
    ours = extract_rows(caches, idxs)
    assert len(ours) == len(idxs)
    for idx, extracted in zip(idxs, ours):
        assert _row_state(extracted) == _row_state([c.extract(idx) for c in caches])


def _cache_state(cache: list) -> list:
    return [(c.offset, None if c.keys is None else (c.keys.tolist(), c.values.tolist()))
            for c in cache]


def test_extract_cache_of_several_sequences_equals_their_extracts_one_by_one(loaded):
    # one host read per batch for all the sequences leaving it (a release of retired ones)
    batch = ServingBatchGenerator(loaded.model, completion_batch_size=8, prefill_batch_size=2,
                                  prefill_step_size=2)
    uids = batch.insert(PROMPTS[:2], max_tokens=[TOKENS] * 2)
    for _ in range(6):
        batch.next()
    uids += batch.insert(PROMPTS[2:] + [[3, 4, 5, 6, 7, 8]], max_tokens=[TOKENS] * 3)
    batch.next()
    stages = sorted(stage for stage, _ in batch._find_uids(uids).values())
    assert stages == [0, 1, 1, 2, 2]   # queued, prefilling, decoding

    together = batch.extract_cache(uids)
    one_by_one = {uid: BatchGenerator.extract_cache(batch, [uid])[uid] for uid in uids}
    assert together.keys() == one_by_one.keys() == set(uids)
    for uid in uids:
        (cache, tokens), (ref_cache, ref_tokens) = together[uid], one_by_one[uid]
        assert list(tokens) == list(ref_tokens)
        assert _cache_state(cache) == _cache_state(ref_cache)
    batch.close()


def test_pause_right_after_resume_keeps_the_output(loaded):
    # A resumed sequence's last generated token is fed with the batch's next step, so until
    # then its cache lacks that token; pausing it again must not cut one more token off.
    params = SamplingParams(max_tokens=10, temperature=0.0)
    runner = ModelRunner(loaded, EngineConfig(prompt_cache_bytes=0))

    def run(interrupt: bool) -> list[int]:
        request = GenerationRequest(prompt=PROMPTS[0], params=params)
        seq = Sequence(request=request, model_name="tiny", prompt_ids=PROMPTS[0],
                       max_tokens=params.max_tokens, stream=None, kv_bytes=0)
        runner.start(seq)
        while len(seq.generated) < params.max_tokens:
            for r in runner.step()[1]:
                if r.uid in runner.by_uid:
                    seq.generated.append(r.token)
                    seq.first_token_at = seq.first_token_at or 1.0
            if interrupt and len(seq.generated) == 4:
                runner.pause(seq)
                runner.resume(seq)
                runner.pause(seq)    # before any step has fed the resumed token
                runner.resume(seq)
                interrupt = False
        runner.remove(seq, to_prefix_cache=False)
        return seq.generated[:params.max_tokens]

    try:
        assert run(interrupt=True) == run(interrupt=False)
    finally:
        runner.close()
    mx.synchronize()
