"""Joining sequences ride the batch's next decode step: same tokens, fewer forward passes."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator

from mlx_serving.engine.batch import ServingBatchGenerator
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


def generate_staggered(cls, model, **kwargs) -> tuple[dict[int, list[int]], dict[int, list[float]]]:
    """Two sequences start, two more join the decoding batch one and three steps later."""
    batch = cls(model, completion_batch_size=8, prefill_batch_size=2, **kwargs)
    tokens: dict[int, list[int]] = {}
    logprobs: dict[int, list[float]] = {}
    arrivals = {0: PROMPTS[:2], 3: PROMPTS[2:3], 5: PROMPTS[3:]}
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
def test_joins_give_batch_generators_tokens_and_logprobs_with_fewer_forward_passes(
        loaded, pad_multiple):
    reference = CountingModel(loaded.model)
    ref_tokens, ref_logprobs = generate_staggered(BatchGenerator, reference)
    ours = CountingModel(loaded.model)
    # padded prompts: their padding, moved left of each row, is masked out
    tokens, logprobs = generate_staggered(ServingBatchGenerator, ours,
                                          prompt_pad_multiple=pad_multiple)

    assert all(len(t) == TOKENS for t in ref_tokens.values())
    assert tokens == ref_tokens   # the echoes of the fed tokens are left out
    for uid in ref_logprobs:
        assert logprobs[uid] == pytest.approx(ref_logprobs[uid], abs=1e-4)
    # BatchGenerator runs a forward pass of its own for each of the three groups that join;
    # the last group's tokens come one decode step later, so the batch decodes once more
    assert ours.calls == reference.calls - 3 + 1


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
