"""Engine behaviour: stop strings, seeds, prefix cache, cancellation, backpressure, errors."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest
from support import async_wait_until, chat, collect, wait_until

from mlx_serving.engine import (
    ContextLengthExceededError,
    Engine,
    EngineClosedError,
    EngineConfig,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    ModelConfig,
    ModelNotFoundError,
    QueueFullError,
    SamplingParams,
)
from mlx_serving.engine.params import build


def make_engine(path, **config) -> Engine:
    max_model_len = config.pop("max_model_len", None)
    model = ModelConfig(name="tiny", path=str(path), max_model_len=max_model_len)
    return Engine(EngineConfig(models=[model], **config))


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    eng = make_engine(tiny_model_path)
    yield eng
    eng.shutdown()


def run(coro):
    return asyncio.run(coro)


# -- output ------------------------------------------------------------------------------------
def test_usage_and_timings(engine):
    out = run(collect(engine, chat("Hello", max_tokens=12, temperature=0, ignore_eos=True)))
    final = out.final
    assert final.finish_reason is FinishReason.LENGTH
    assert final.usage.completion_tokens == len(out.token_ids) == 12
    assert final.usage.prompt_tokens > 0
    t = final.timings
    assert 0 <= t.queued_s <= t.ttft_s <= t.total_s and t.decode_s >= 0


def _token_boundaries(engine, token_ids):
    """Character offsets in the decoded text where one token's text ends."""
    decode = engine.model("tiny").tokenizer.decode
    return {len(decode(token_ids[:i])) for i in range(1, len(token_ids))}


def test_stop_string_across_deltas(engine):
    full = run(collect(engine, chat("Once upon a time", max_tokens=48, temperature=0,
                                    ignore_eos=True)))
    boundaries = _token_boundaries(engine, full.token_ids)
    # A 6-character stop string that first occurs at its position and spans 2+ token
    # boundaries, so it is assembled from several deltas.
    start = next(k for k in range(10, len(full.text) - 6)
                 if full.text.find(full.text[k:k + 6]) == k
                 and len(boundaries & set(range(k + 1, k + 6))) >= 2)
    stop = full.text[start:start + 6]
    out = run(collect(engine, chat("Once upon a time", max_tokens=48, temperature=0,
                                   ignore_eos=True, stop=["never-matches", stop])))
    assert out.text == full.text[:start]
    assert out.final.finish_reason is FinishReason.STOP
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(full.token_ids)


def test_stop_token_ids(engine):
    full = run(collect(engine, chat("List three colours", max_tokens=30, temperature=0,
                                    ignore_eos=True)))
    stop_id = full.token_ids[10]
    first = full.token_ids.index(stop_id)
    out = run(collect(engine, chat("List three colours", max_tokens=30, temperature=0,
                                   ignore_eos=True, stop_token_ids=[stop_id])))
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.final.finish_reason is FinishReason.STOP


# -- sampling -------------------------------------------------------------------------------------
def test_same_seed_same_output_alone_and_in_a_mixed_batch(engine):
    seeded = dict(max_tokens=40, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = run(collect(engine, chat("Pick a card", **seeded)))

    async def mixed():
        others = [
            chat("Pick a card", max_tokens=25, temperature=0.9, seed=99, ignore_eos=True),
            chat("Another request", max_tokens=60, temperature=0, ignore_eos=True),
            chat("Unseeded", max_tokens=33, temperature=1.0, ignore_eos=True),
            chat("Penalised", max_tokens=20, temperature=0.7, seed=5, repetition_penalty=1.3),
            chat("Top-k", max_tokens=50, temperature=1.0, top_k=5, seed=7, ignore_eos=True),
            chat("Greedy with logprobs", max_tokens=15, temperature=0, logprobs=True,
                 top_logprobs=3),
            chat("Min-p", max_tokens=45, temperature=1.2, min_p=0.1, ignore_eos=True),
        ]
        tasks = [asyncio.create_task(collect(engine, r)) for r in others[:4]]
        mine = asyncio.create_task(collect(engine, chat("Pick a card", **seeded)))
        tasks += [asyncio.create_task(collect(engine, r)) for r in others[4:]]
        return await mine, await asyncio.gather(*tasks)

    in_batch, others = run(mixed())
    assert in_batch.token_ids == alone.token_ids
    assert others[0].token_ids[:25] != alone.token_ids[:25]  # another seed differs
    assert len(set(alone.token_ids)) > 10                    # it really sampled


@pytest.mark.parametrize("seed", [None, 3])
def test_top_k_of_the_whole_vocabulary_is_no_top_k(engine, seed):
    # Regression: top_k >= vocab_size made mlx-lm's argpartition fail and ended the whole
    # batch with an engine error.
    vocab = engine.list_models()[0].vocab_size
    out = run(collect(engine, chat("Hi", max_tokens=6, temperature=1.0, top_k=vocab + 5,
                                   seed=seed, ignore_eos=True)))
    assert out.final.error is None and len(out.token_ids) == 6
    again = run(collect(engine, chat("Hi", max_tokens=6, temperature=1.0, top_k=vocab,
                                     seed=seed, ignore_eos=True)))
    assert again.final.error is None and len(again.token_ids) == 6
    if seed is not None:   # the same as sampling without top-k
        plain = run(collect(engine, chat("Hi", max_tokens=6, temperature=1.0, seed=seed,
                                         ignore_eos=True)))
        assert out.token_ids == again.token_ids == plain.token_ids


def test_first_and_last_delta_carry_usage(engine):
    async def deltas():
        return [d async for d in engine.generate(chat("Hi", max_tokens=5, temperature=0,
                                                         ignore_eos=True))]

    out = run(deltas())
    first, last = out[0], out[-1]
    assert first.usage is not None and first.usage.prompt_tokens == last.usage.prompt_tokens > 0
    assert first.usage.completion_tokens == 1 and last.usage.completion_tokens == 5
    assert all(d.usage is None for d in out[1:-1])


def test_top_logprobs(engine):
    out = run(collect(engine, chat("Hi", max_tokens=5, temperature=0, logprobs=True,
                                   top_logprobs=3, ignore_eos=True)))
    for lp in out.logprobs:
        assert len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
        assert lp.top[0][1] == pytest.approx(lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


# -- prefix cache ---------------------------------------------------------------------------------
def test_prefix_cache_hit_gives_identical_output(tiny_model_path):
    eng = make_engine(tiny_model_path, prompt_cache_bytes=64 * 2**20)
    try:
        system = {"role": "system", "content": "You are a terse assistant. " * 12}
        params = SamplingParams(max_tokens=24, temperature=0, logprobs=True, ignore_eos=True)

        def request(question):
            return GenerationRequest(messages=[system, {"role": "user", "content": question}],
                                     params=params)

        cold = run(collect(eng, request("What is MLX?")))
        assert cold.final.usage.cached_tokens == 0
        warm = run(collect(eng, request("What is MLX?")))
        assert warm.final.usage.cached_tokens == warm.final.usage.prompt_tokens - 1
        assert warm.token_ids == cold.token_ids
        assert [lp.logprob for lp in warm.logprobs] == pytest.approx(
            [lp.logprob for lp in cold.logprobs], abs=1e-5)
        # Another question after the same system prompt reuses the shared prefix.
        other = run(collect(eng, request("And Ray Serve?")))
        assert other.final.usage.cached_tokens > 40
        baseline = make_engine(tiny_model_path, prompt_cache_bytes=0)
        try:
            uncached = run(collect(baseline, request("And Ray Serve?")))
        finally:
            baseline.shutdown()
        assert other.token_ids == uncached.token_ids
        assert eng.stats().prefix_cache_hits >= 2
    finally:
        eng.shutdown()


# -- cancellation and backpressure -------------------------------------------------------------------
def test_prefix_cache_holds_only_what_it_counts(tiny_model_path):
    # Regression: the KV caches mlx-lm extracts from the batch for the prefix cache were lazy
    # slices that kept the whole batch's KV buffers alive while reporting one sequence's
    # size, so the cache pinned far more memory than prompt_cache_bytes allowed.
    eng = make_engine(tiny_model_path, prompt_cache_bytes=64 * 2**20, max_batch_size=8)

    def net_memory() -> int:
        stats = eng.stats()
        return stats.active_memory_bytes - stats.prefix_cache_bytes

    async def wave(tag: str):
        # Different lengths, so sequences leave the batch at different steps.
        reqs = [chat(f"{tag} {i} " + "lorem ipsum dolor " * 40, max_tokens=8 + 4 * i,
                     temperature=0, ignore_eos=True) for i in range(8)]
        return await asyncio.gather(*(collect(eng, r) for r in reqs))

    try:
        run(wave("warm-up"))
        wait_until(lambda: eng.stats().running == 0)
        baseline = net_memory()
        for w in range(4):
            run(wave(f"wave {w}"))
        wait_until(lambda: eng.stats().running == 0)
        assert eng.stats().prefix_cache_bytes > 0
        assert net_memory() <= baseline + (1 << 20), (baseline, net_memory())
    finally:
        eng.shutdown()


def test_cancellation_frees_the_slot_within_a_step(engine):
    async def go():
        gen = engine.generate(chat("Go on forever", max_tokens=5000, temperature=0,
                                   ignore_eos=True))
        received = 0
        async for delta in gen:
            received += len(delta.token_ids)
            if received >= 5:
                break
        steps_at_cancel = engine.stats().steps
        await gen.aclose()  # what a vanished HTTP client does
        await async_wait_until(lambda: engine.stats().running == 0)
        return steps_at_cancel

    steps_at_cancel = run(go())
    stats = engine.stats()
    assert stats.in_batch == 0 and stats.running == 0 and stats.paused == 0
    assert stats.steps - steps_at_cancel <= 1
    assert stats.kv_reserved_bytes == 0


def _long(tag: str):
    return chat(f"long {tag}", max_tokens=100_000, temperature=0, ignore_eos=True)


async def _start_long(eng, n: int = 2) -> list[asyncio.Task]:
    """``n`` endless sequences, once all of them decode."""
    tasks = [asyncio.create_task(collect(eng, _long(str(i)))) for i in range(n)]
    await async_wait_until(lambda: eng.stats().running == n)
    return tasks


async def _end(tasks) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_prefill_gate_holds_an_arrival_until_another_joins_it(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=8, prefill_wait_steps=1_000_000,
                      prefill_wait_ratio=1.0)
    try:
        async def go():
            running = await _start_long(eng)
            first = asyncio.create_task(collect(eng, chat("first", max_tokens=3)))
            await async_wait_until(lambda: eng.stats().waiting == 1)
            steps = eng.stats().steps
            await async_wait_until(lambda: eng.stats().steps >= steps + 20)
            held = eng.stats()
            # Two waiting against two running reach the ratio: both join.
            second = asyncio.create_task(collect(eng, chat("second", max_tokens=3)))
            outs = await asyncio.gather(first, second)
            await _end(running)
            return held, outs

        held, outs = run(go())
        assert (held.waiting, held.running) == (1, 2)
        assert [o.final.usage.completion_tokens for o in outs] == [3, 3]
    finally:
        eng.shutdown()


def test_prefill_gate_holds_a_lone_arrival_a_bounded_number_of_steps(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=8, prefill_wait_steps=5,
                      prefill_wait_ratio=100.0)
    try:
        async def go():
            running = await _start_long(eng)
            out = await collect(eng, chat("alone", max_tokens=3))
            still_running = eng.stats().running
            await _end(running)
            return out, still_running

        out, still_running = run(go())
        assert out.final.usage.completion_tokens == 3
        assert still_running == 2   # it joined the decoding batch, not an idle one
    finally:
        eng.shutdown()


def test_a_finished_sequence_is_delivered_at_once_and_leaves_the_batch_later(tiny_model_path):
    """Its last token reaches the reader on the step that made it; its batch slot is released
    with the next change of the batch, or after prefill_wait_steps; the prefix it leaves in
    the cache holds only its own tokens, not those decoded while it waited."""
    eng = make_engine(tiny_model_path, prompt_cache_bytes=64 * 2**20, max_batch_size=8,
                      prefill_wait_steps=300, prefill_wait_ratio=100.0)
    question = chat("What is MLX? " * 6, max_tokens=6, temperature=0, logprobs=True,
                    ignore_eos=True)
    try:
        async def go():
            short = asyncio.create_task(collect(eng, question))
            running = [asyncio.create_task(collect(eng, _long(str(i)))) for i in range(2)]
            cold = await short
            at_finish = eng.stats()
            await async_wait_until(lambda: eng.stats().in_batch == 2, timeout=60)
            released = eng.stats()
            warm = await collect(eng, question)   # joins the decoding batch from the cache
            await _end(running)
            return cold, at_finish, released, warm

        cold, at_finish, released, warm = run(go())
        assert cold.final.usage.completion_tokens == 6
        assert (at_finish.running, at_finish.in_batch) == (2, 3)
        assert released.steps - at_finish.steps >= 100   # it waited, bounded by 300 steps
        assert warm.final.usage.cached_tokens == warm.final.usage.prompt_tokens - 1
        assert warm.token_ids == cold.token_ids
        assert [lp.logprob for lp in warm.logprobs] == pytest.approx(
            [lp.logprob for lp in cold.logprobs], abs=1e-4)
    finally:
        eng.shutdown()


def test_retired_sequences_leave_the_batch_when_the_last_live_one_is_cancelled(
        tiny_model_path):
    # Regression: the engine thread only steps a batch with live sequences, and retired ones
    # were released by a step; cancelling the last live sequence left them in the batch.
    eng = make_engine(tiny_model_path, max_batch_size=8, prefill_wait_steps=1_000,
                      prefill_wait_ratio=100.0)
    try:
        async def go():
            short = asyncio.create_task(
                collect(eng, chat("short", max_tokens=3, temperature=0, ignore_eos=True)))
            running = [asyncio.create_task(collect(eng, _long("0")))]
            await short
            retired_while_live = eng.stats()
            await _end(running)
            await async_wait_until(lambda: eng.stats().running == 0, timeout=30)
            return retired_while_live

        retired_while_live = run(go())
        assert (retired_while_live.running, retired_while_live.in_batch) == (1, 2)
        wait_until(lambda: eng.stats().in_batch == 0, timeout=10)
    finally:
        eng.shutdown()


def test_a_cancelled_sequence_counts_as_running_until_the_batch_lets_it_go(engine):
    # Regression: stats(), read from another thread, saw running == 0 while mlx-lm's batch
    # still held the cancelled sequence (the books changed before the batch did).
    runner = engine._scheduler.runners["tiny"]
    batch = runner.batch
    seen = []

    def remove(uids, return_prompt_caches=False):
        seen.append((engine.stats().running, engine.stats().in_batch))
        return type(batch).remove(batch, uids, return_prompt_caches)

    batch.remove = remove
    try:
        async def go():
            running = await _start_long(engine, 1)
            await _end(running)
            await async_wait_until(lambda: engine.stats().running == 0, timeout=30)

        run(go())
    finally:
        del batch.remove
    assert seen and seen[0] == (1, 1)
    assert engine.stats().in_batch == 0


def test_tokens_decoded_for_a_retired_sequence_are_not_counted(tiny_model_path):
    # Regression: the generated-tokens counter counted every token the batch decoded,
    # including those of finished sequences waiting for their slot's release.
    eng = make_engine(tiny_model_path, max_batch_size=8, prefill_wait_steps=100)
    try:
        before = eng.stats().generated_tokens

        async def go():
            return await asyncio.gather(
                collect(eng, chat("short", max_tokens=4, temperature=0, ignore_eos=True)),
                collect(eng, chat("longer", max_tokens=40, temperature=0, ignore_eos=True)))

        outs = run(go())
        assert [o.final.usage.completion_tokens for o in outs] == [4, 40]
        assert eng.stats().generated_tokens - before == 44
    finally:
        eng.shutdown()


def test_stats_sum_the_queue_time_and_ttft_of_finished_requests(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=8)
    try:
        before = eng.stats()

        async def go():
            return await asyncio.gather(*(collect(eng, chat(f"q{i}", max_tokens=3, ignore_eos=True))
                                          for i in range(3)))

        outs = run(go())
        after = eng.stats()
        assert after.finished - before.finished == 3
        timings = [o.final.timings for o in outs]
        assert after.queued_s - before.queued_s == pytest.approx(sum(t.queued_s for t in timings))
        assert after.ttft_s - before.ttft_s == pytest.approx(sum(t.ttft_s for t in timings))
        assert after.request_s - before.request_s == pytest.approx(sum(t.total_s for t in timings))
        assert all(0 <= t.queued_s < t.ttft_s for t in timings)
        # from admission, each waited for and ran its prompt pass, then joined the decode
        # batch; there its last prompt token is fed with the next step (the echo), and the
        # step after that returns its first token
        to_decode = after.to_decode_s - before.to_decode_s
        assert 0 < to_decode < sum(t.ttft_s - t.queued_s for t in timings)
        assert after.to_decode_steps - before.to_decode_steps >= 3
        assert after.to_token_steps - before.to_token_steps == 3 * 2
    finally:
        eng.shutdown()


def test_slow_reader_is_paused_and_output_unchanged(tiny_model_path):
    eng = make_engine(tiny_model_path, stream_buffer_tokens=4)
    try:
        async def read_slowly(req):
            tokens = []
            async for delta in eng.generate(req):
                tokens += delta.token_ids
                await asyncio.sleep(0.01)
            return tokens

        for params in (dict(temperature=0), dict(temperature=1.0, seed=11)):
            req = chat("Tell a long story", max_tokens=80, ignore_eos=True, **params)
            fast = run(collect(eng, req)).token_ids
            slow = run(read_slowly(req))
            assert slow == fast
        assert eng._scheduler.counters.paused_total > 0
    finally:
        eng.shutdown()


def test_reader_that_never_reads_is_bounded_and_ended(tiny_model_path):
    eng = make_engine(tiny_model_path, stream_buffer_tokens=32, stalled_reader_timeout_s=1.0)
    try:
        async def go():
            stream = eng.submit(chat("Never read me", max_tokens=100_000, temperature=0,
                                     ignore_eos=True))
            await async_wait_until(lambda: eng.stats().paused == 1)
            paused_memory = mx.get_active_memory()
            await async_wait_until(lambda: eng.stats().paused == 0 and eng.stats().running == 0)
            deltas = [d async for d in stream]
            return deltas, paused_memory

        deltas, paused_memory = run(go())
        tokens = sum(len(d.token_ids) for d in deltas)
        assert 32 <= tokens <= 40                  # paused once the buffer held 32 tokens
        assert len(deltas) == 1                    # coalesced, nothing dropped
        final = deltas[-1]
        assert final.finish_reason is FinishReason.ERROR
        assert final.error_code == "reader_stalled" and "did not read" in final.error
        assert final.usage.completion_tokens == tokens
        # The KV cache of ~40 tokens, not of 100k: well under 10 MB for this model.
        assert paused_memory < 10 * 2**20
        assert eng.stats().kv_reserved_bytes == 0
    finally:
        eng.shutdown()


# -- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("temperature", 3.0), ("top_p", 0.0), ("top_k", -1),
    ("max_tokens", 0), ("max_tokens", -5), ("top_logprobs", 21), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("stop", [""]), ("stop", ["x"] * 17), ("seed", "abc"),
    ("logit_bias", {5: 500.0}), ("top_logprobs", 2),
])
def test_bad_parameter_names_the_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        build(SamplingParams, **{field: value})
    assert info.value.param.split(".")[0] == field
    assert info.value.message.startswith(field)


def test_out_of_vocabulary_ids_are_refused(engine):
    async def go(**fields):
        engine.submit(GenerationRequest(**fields))

    with pytest.raises(InvalidRequestError) as info:
        run(go(prompt="hi", params=SamplingParams(stop_token_ids=[10**7])))
    assert info.value.param == "stop_token_ids"
    with pytest.raises(InvalidRequestError) as info:
        run(go(prompt=[1, 2, -3]))
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as info:
        run(go(prompt="hi", params=SamplingParams(logit_bias={10**7: 1.0})))
    assert info.value.param == "logit_bias"


def test_prompt_longer_than_context(tiny_model_path):
    eng = make_engine(tiny_model_path, max_model_len=64)
    try:
        async def go(**fields):
            eng.submit(GenerationRequest(**fields))

        with pytest.raises(ContextLengthExceededError) as info:
            run(go(prompt=list(range(1, 80))))
        assert info.value.param == "prompt" and "64" in info.value.message
        with pytest.raises(ContextLengthExceededError) as info:
            run(go(messages=[{"role": "user", "content": "word " * 100}]))
        assert info.value.param == "messages"
        with pytest.raises(ContextLengthExceededError) as info:
            run(go(prompt=list(range(1, 40)), params=SamplingParams(max_tokens=30)))
        assert info.value.param == "max_tokens"
        # Without max_tokens the completion is capped by the room left in the context.
        out = run(collect(eng, GenerationRequest(
            prompt=list(range(1, 40)), params=SamplingParams(temperature=0, ignore_eos=True))))
        assert out.final.usage.completion_tokens == 64 - 39
        assert out.final.finish_reason is FinishReason.LENGTH
    finally:
        eng.shutdown()


def test_unknown_model(engine):
    async def go():
        engine.submit(GenerationRequest(model="nope", prompt="hi"))

    with pytest.raises(ModelNotFoundError) as info:
        run(go())
    assert info.value.param == "model"


def test_full_queue_is_refused(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=1, max_waiting_requests=2)
    try:
        async def go():
            long = chat("long", max_tokens=100_000, temperature=0, ignore_eos=True)
            running = eng.submit(long)
            await async_wait_until(lambda: eng.stats().running == 1)
            queued = [eng.submit(chat(f"q{i}", max_tokens=2)) for i in range(2)]
            with pytest.raises(QueueFullError) as info:
                eng.submit(chat("one too many", max_tokens=2))
            assert info.value.retry_after > 0
            running.cancel()
            return [[d async for d in s][-1] for s in queued]

        finals = run(go())
        assert all(f.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) for f in finals)
    finally:
        eng.shutdown()


def test_kv_budget_makes_requests_wait_not_fail(tiny_model_path):
    probe = make_engine(tiny_model_path)
    per_token = probe.list_models()[0].kv_bytes_per_token
    probe.shutdown()
    # A short prompt + 600 tokens reserves 768 tokens of KV: the budget holds one, not two.
    # Both are queued at once, so the queue's KV bound must hold two.
    eng = make_engine(tiny_model_path, kv_memory_bytes=int(per_token * 768 * 1.5),
                      max_waiting_kv_fraction=2.0)
    try:
        async def go():
            reqs = [chat(f"r{i}", max_tokens=600, temperature=0, ignore_eos=True) for i in range(2)]
            tasks = [asyncio.create_task(collect(eng, r)) for r in reqs]
            await async_wait_until(lambda: eng.stats().running == 1)
            assert eng.stats().waiting == 1
            return await asyncio.gather(*tasks)

        outs = run(go())
        assert [o.final.usage.completion_tokens for o in outs] == [600, 600]
        assert outs[1].final.timings.queued_s > outs[0].final.timings.queued_s
    finally:
        eng.shutdown()


def test_step_failure_ends_requests_with_error_and_engine_recovers(tiny_model_path):
    eng = make_engine(tiny_model_path)
    try:
        runner = eng._scheduler.runners["tiny"]
        real_step = runner.step
        calls = {"n": 0}
        cache = {}

        def failing_step():
            calls["n"] += 1
            if calls["n"] == 3:
                cache["at_failure"] = mx.get_cache_memory()
                raise RuntimeError("simulated MLX failure")
            if calls["n"] == 4:
                cache["next_step"] = mx.get_cache_memory()
            return real_step()

        runner.step = failing_step
        out = run(collect(eng, chat("x", max_tokens=50, temperature=0, ignore_eos=True)))
        assert out.final.finish_reason is FinishReason.ERROR
        assert "simulated MLX failure" in out.final.error
        assert eng.is_healthy()
        again = run(collect(eng, chat("x", max_tokens=5, temperature=0, ignore_eos=True)))
        assert again.final.finish_reason is FinishReason.LENGTH
        # A failed step is most often a failed allocation: MLX's cache is handed back. (An
        # 8B model's engine that had filled an H100 failed its next steps as well.)
        assert cache["at_failure"] > 0 and cache["next_step"] < cache["at_failure"], cache
    finally:
        eng.shutdown()


def break_admission(eng) -> None:
    """The engine thread dies of a bug the next time it admits a waiting request."""
    scheduler = eng._scheduler
    admit = scheduler._admit

    def broken_admit():
        if scheduler._waiting:
            raise RuntimeError("scheduler bug")
        admit()

    scheduler._admit = broken_admit


def test_dead_engine_thread_fails_requests_and_health(tiny_model_path):
    eng = make_engine(tiny_model_path)
    try:
        async def go():
            break_admission(eng)
            stream = eng.submit(chat("x", max_tokens=5))
            return [d async for d in stream][-1]

        final = run(go())
        assert final.finish_reason is FinishReason.ERROR and "scheduler bug" in final.error
        wait_until(lambda: not eng.is_healthy())

        async def submit_again():
            eng.submit(chat("x", max_tokens=5))

        with pytest.raises(EngineClosedError):
            run(submit_again())
    finally:
        eng.shutdown()


def test_a_request_that_races_the_engine_threads_death_is_refused_not_lost(tiny_model_path):
    """``submit`` checks the engine's health before it queues: a thread that dies in between
    has already emptied its inbox, so a request queued then was never answered (its reader
    hung; seen in CI when the thread died before the test's request arrived). The queue
    now refuses work once the thread has stopped taking it."""
    eng = make_engine(tiny_model_path)
    try:
        async def kill_the_thread():
            break_admission(eng)
            return [d async for d in eng.submit(chat("x", max_tokens=5))][-1]

        assert run(kill_the_thread()).finish_reason is FinishReason.ERROR
        wait_until(lambda: not eng._scheduler.alive)
        eng.is_healthy = lambda: True   # submit's check passes, as just before the death

        async def submit_late():
            eng.submit(chat("x", max_tokens=5))

        with pytest.raises(EngineClosedError):
            run(submit_late())
        assert eng._scheduler.call(lambda: None).exception(timeout=1) is not None
    finally:
        eng.shutdown()


def test_load_list_unload(engine, tiny_model_path):
    info = engine.load_model(ModelConfig(name="second", path=str(tiny_model_path), warmup=False))
    try:
        assert {m.name for m in engine.list_models()} == {"tiny", "second"}
        assert info.context_length == 131072

        async def go(model):
            return await collect(engine, GenerationRequest(
                model=model, prompt="hi", params=SamplingParams(max_tokens=3, temperature=0)))

        assert run(go("second")).final.usage.completion_tokens == 3
        with pytest.raises(InvalidRequestError):  # two models: the request must name one
            run(go(None))
    finally:
        engine.unload_model("second")
    assert [m.name for m in engine.list_models()] == ["tiny"]
    with pytest.raises(ModelNotFoundError):
        engine.unload_model("second")


def test_process_exits_cleanly_after_engine_use(tiny_model_path, tmp_path):
    """Regression: MLX's thread-local compile cache aborted the process at exit when the
    engine thread's native teardown overlapped interpreter shutdown (SIGABRT, exit 134)."""
    import subprocess
    import sys

    script = tmp_path / "use_engine.py"
    script.write_text(
        "import asyncio, sys\n"
        "from mlx_serving.engine import *\n"
        "eng = Engine(EngineConfig(models=[ModelConfig(name='m', path=sys.argv[1])]))\n"
        "async def main():\n"
        "    async for _ in eng.generate(GenerationRequest(prompt='hi', params=SamplingParams(max_tokens=3))):\n"
        "        pass\n"
        "asyncio.run(main())\n"
        "if sys.argv[2] == 'shutdown':\n"
        "    eng.shutdown()\n")
    for mode in ("shutdown", "shutdown", "atexit", "atexit"):
        done = subprocess.run([sys.executable, str(script), str(tiny_model_path), mode],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "terminate called" not in done.stderr
