"""Quality of service in the engine: admission bounds, load shedding, priorities, deadlines."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from support import Collected, async_wait_until, collect

from mlx_serving.engine import (
    AdmissionSettings,
    Engine,
    EngineConfig,
    EngineProcess,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    LoadShedError,
    ModelConfig,
    Priority,
    QueueFullError,
    SamplingParams,
)
from mlx_serving.engine.admission import AdmissionControl

BATCH = Priority.BATCH


def make_engine(path, **config) -> Engine:
    return Engine(EngineConfig(models=[ModelConfig(name="tiny", path=str(path))], **config))


def run(coro):
    return asyncio.run(coro)


def request(content: str = "hi", *, priority: Priority = Priority.INTERACTIVE,
            timeout_s: float | None = None, **params) -> GenerationRequest:
    params.setdefault("temperature", 0)
    params.setdefault("ignore_eos", True)
    return GenerationRequest(messages=[{"role": "user", "content": content}],
                             params=SamplingParams(**params), priority=priority,
                             timeout_s=timeout_s)


def prompt_request(tokens: int, **fields) -> GenerationRequest:
    return GenerationRequest(prompt=list(range(5, 5 + tokens)),
                             params=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                             **fields)


async def drain(stream) -> Collected:
    out = Collected()
    async for delta in stream:
        out.deltas += 1
        out.text += delta.text
        out.token_ids += delta.token_ids
        if delta.finished:
            out.final = delta
    return out


async def submit_and_drain(engine: Engine, req: GenerationRequest) -> Collected:
    return await drain(engine.submit(req))


@contextlib.asynccontextmanager
async def slot_taken(engine: Engine):
    """Keep the engine's only batch slot (max_batch_size=1) busy with an interactive request,
    read all along so that it is never paused."""
    stream = engine.submit(request("block", max_tokens=100_000))
    reader = asyncio.create_task(drain(stream))
    await async_wait_until(lambda: engine.stats().running == 1)
    try:
        yield stream
    finally:
        stream.cancel()
        await reader


def assert_idle(engine) -> None:
    stats = engine.stats()
    assert (stats.waiting, stats.running, stats.paused, stats.kv_reserved_bytes) == (0, 0, 0, 0)


# -- priorities ----------------------------------------------------------------------------------
def test_interactive_is_admitted_before_earlier_batch_requests(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=1)
    try:
        async def go():
            finished = []

            async def follow(name, stream):
                out = await drain(stream)
                finished.append(name)
                return out

            async with slot_taken(eng):
                names = ["batch-1", "batch-2", "interactive"]
                streams = [eng.submit(request("b1", max_tokens=4, priority=BATCH)),
                           eng.submit(request("b2", max_tokens=4, priority=BATCH)),
                           eng.submit(request("i", max_tokens=4))]
                stats = eng.stats()
                assert (stats.waiting, stats.waiting_batch) == (3, 2)
                tasks = [asyncio.create_task(follow(n, s)) for n, s in zip(names, streams)]
            outs = await asyncio.gather(*tasks)
            return finished, outs

        finished, outs = run(go())
        assert finished == ["interactive", "batch-1", "batch-2"]
        assert all(o.final.finish_reason is FinishReason.LENGTH for o in outs)
        assert eng.stats().preempted == 0   # the slot was held by interactive work
        assert_idle(eng)
    finally:
        eng.shutdown()


def test_interactive_preempts_batch_which_then_finishes_unchanged(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=1)
    try:
        batch_request = request("a long batch job", max_tokens=600, priority=BATCH)
        alone = run(collect(eng, batch_request))

        async def go():
            finished = []

            async def follow(name, stream):
                out = await drain(stream)
                finished.append(name)
                return out

            batch_stream = eng.submit(batch_request)
            first = await batch_stream.__anext__()   # decoding: it can be preempted
            batch = asyncio.create_task(follow("batch", batch_stream))
            interactive = asyncio.create_task(
                follow("interactive", eng.submit(request("now please", max_tokens=8))))
            await async_wait_until(lambda: eng.stats().preempted == 1)
            assert eng.stats().paused == 1
            return finished, first, await batch, await interactive

        finished, first, rest, interactive = run(go())
        assert finished == ["interactive", "batch"]
        assert interactive.final.usage.completion_tokens == 8
        assert rest.final.finish_reason is FinishReason.LENGTH
        assert first.token_ids + rest.token_ids == alone.token_ids
        assert first.text + rest.text == alone.text
        stats = eng.stats()
        assert stats.preempted == 1 and stats.pauses == 0
        assert_idle(eng)
    finally:
        eng.shutdown()


def test_interactive_preempts_batch_to_fit_the_kv_budget(tiny_model_path):
    probe = make_engine(tiny_model_path)
    per_token = probe.list_models()[0].kv_bytes_per_token
    probe.shutdown()
    # Each request reserves 1024 tokens of KV and the budget holds 1792: the interactive one
    # fits only once the batch job, preempted early, gives back what its cache does not use.
    eng = make_engine(tiny_model_path, kv_memory_bytes=per_token * 1792)
    try:
        async def go():
            batch = eng.submit(request("batch", max_tokens=1000, priority=BATCH))
            first = await batch.__anext__()
            interactive = await drain(eng.submit(GenerationRequest(
                prompt=list(range(5, 1005)),
                params=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))))
            stats = eng.stats()
            rest = await drain(batch)
            return stats, len(first.token_ids) + len(rest.token_ids), interactive, rest

        stats, batch_tokens, interactive, rest = run(go())
        assert stats.preempted == 1
        assert interactive.final.finish_reason is FinishReason.LENGTH
        assert rest.final.usage.completion_tokens == batch_tokens == 1000
        assert_idle(eng)
    finally:
        eng.shutdown()


# -- deadlines -----------------------------------------------------------------------------------
def test_deadline_passes_while_waiting(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=1)
    try:
        async def go():
            async with slot_taken(eng):
                late = eng.submit(request("never admitted", max_tokens=4, timeout_s=0.2))
                out = await drain(late)
                stats = eng.stats()
                assert (stats.waiting, stats.running, stats.expired) == (0, 1, 1)
            await async_wait_until(lambda: eng.stats().running == 0)
            return out

        out = run(go())
        final = out.final
        assert final.finish_reason is FinishReason.ERROR
        assert final.error_code == "deadline_exceeded"
        assert "deadline of 0.2 s" in final.error and "waiting" in final.error
        assert final.usage.completion_tokens == 0 and out.token_ids == []
        assert_idle(eng)
    finally:
        eng.shutdown()


def test_a_deadline_set_upstream_counts_the_time_before_submission(tiny_model_path):
    """A request's ``deadline_at`` (set where it first arrived, the Router) holds when it
    comes before ``timeout_s`` from submission: time spent upstream counts. A request that
    arrives past it ends before it is admitted; without ``deadline_at`` the same
    ``timeout_s`` runs from submission."""
    import time

    eng = make_engine(tiny_model_path, max_batch_size=1)
    try:
        async def go():
            async with slot_taken(eng):
                spent = request("spent upstream", max_tokens=4, timeout_s=30.0).model_copy(
                    update={"deadline_at": time.time() - 0.1})
                expired = await drain(eng.submit(spent))
                near = request("near", max_tokens=4, timeout_s=30.0).model_copy(
                    update={"deadline_at": time.time() + 0.3})
                started = time.monotonic()
                ended = await drain(eng.submit(near))
                return expired, ended, time.monotonic() - started

        expired, ended, waited = run(go())
        for out in (expired, ended):
            assert out.final.error_code == "deadline_exceeded" and "waiting" in out.final.error
            assert out.token_ids == []
        assert 0.2 <= waited < 5.0   # the upstream deadline, not 30 s from submission
        assert eng.stats().expired == 2
        assert_idle(eng)
    finally:
        eng.shutdown()


def test_deadline_passes_while_running(tiny_model_path):
    eng = make_engine(tiny_model_path)
    try:
        # Long enough for the prompt to be prefilled on a loaded 2-core CI box.
        out = run(collect(eng, request("go on", max_tokens=100_000, timeout_s=3.0)))
        final = out.final
        assert final.finish_reason is FinishReason.ERROR
        assert final.error_code == "deadline_exceeded" and "running" in final.error
        assert final.usage.completion_tokens == len(out.token_ids) > 0
        assert eng.stats().expired == 1
        assert_idle(eng)
    finally:
        eng.shutdown()


def test_deadline_passes_while_preempted(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=1)
    try:
        async def go():
            batch = eng.submit(request("batch", max_tokens=100_000, priority=BATCH,
                                       timeout_s=1.0))
            await batch.__anext__()
            interactive = eng.submit(request("interactive", max_tokens=100_000))
            reader = asyncio.create_task(drain(interactive))   # keeps it from pausing
            out = await drain(batch)
            interactive.cancel()
            return out, await reader

        out, interactive = run(go())
        assert out.final.error_code == "deadline_exceeded" and "paused" in out.final.error
        assert interactive.final.finish_reason is FinishReason.CANCELLED
        stats = eng.stats()
        assert (stats.preempted, stats.expired) == (1, 1)
        assert_idle(eng)
    finally:
        eng.shutdown()


# -- admission bounds ----------------------------------------------------------------------------
@pytest.mark.parametrize("settings,first,second,limit,words", [
    (dict(max_waiting_requests=1), 3, 3, "requests", "requests"),
    (dict(max_waiting_tokens=100), 60, 60, "tokens", "prompt tokens"),
    # A bound below one request's KV: only an empty queue takes one.
    (dict(kv_memory_bytes=2**30, max_waiting_kv_fraction=1e-6), 3, 3, "kv_memory", "KV memory"),
])
def test_each_queue_bound_refuses_with_retry_after(tiny_model_path, settings, first, second,
                                                   limit, words):
    eng = make_engine(tiny_model_path, max_batch_size=1, **settings)
    try:
        async def go():
            async with slot_taken(eng):
                queued = eng.submit(prompt_request(first))
                with pytest.raises(QueueFullError) as info:
                    eng.submit(prompt_request(second))
                assert eng.stats().waiting == 1
            return info.value, await drain(queued)

        err, queued = run(go())
        assert err.code == "queue_full" and err.limit == limit
        assert words in err.message
        assert 1.0 <= err.retry_after <= 60.0
        assert queued.final.finish_reason is FinishReason.LENGTH   # the queued one still runs
        assert eng.stats().rejected == 1
    finally:
        eng.shutdown()


def test_a_request_larger_than_a_bound_is_queued_when_the_queue_is_empty(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=1, max_waiting_tokens=10)
    try:
        async def go():
            async with slot_taken(eng):
                big = eng.submit(prompt_request(50))
                assert eng.stats().waiting_tokens == 50
            return await drain(big)

        assert run(go()).final.finish_reason is FinishReason.LENGTH
    finally:
        eng.shutdown()


def test_scale_lowers_every_bound(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=1, max_waiting_requests=4)
    try:
        assert eng.admission() == AdmissionSettings(scale=1.0, shed_batch=False)
        assert eng.set_admission(scale=0.5) == AdmissionSettings(scale=0.5, shed_batch=False)
        with pytest.raises(InvalidRequestError):
            eng.set_admission(scale=0.0)
        with pytest.raises(InvalidRequestError):
            eng.set_admission(scale=1.5)
        assert eng.admission().scale == 0.5

        async def go():
            async with slot_taken(eng):
                queued = [eng.submit(prompt_request(3)) for _ in range(2)]
                with pytest.raises(QueueFullError) as info:
                    eng.submit(prompt_request(3))
                assert "limit is 2 requests" in info.value.message
                eng.set_admission(scale=1.0)
                queued.append(eng.submit(prompt_request(3)))
                assert eng.stats().waiting == 3
            return [await drain(s) for s in queued]

        outs = run(go())
        assert all(o.final.finish_reason is FinishReason.LENGTH for o in outs)
        stats = eng.stats()
        assert (stats.rejected, stats.admission_scale) == (1, 1.0)
    finally:
        eng.shutdown()


def test_free_batch_slots_are_not_counted_as_queue():
    control = AdmissionControl(EngineConfig(max_waiting_requests=2), kv_budget_bytes=2**30)
    for _ in range(5):   # 3 free slots + the queue of 2
        control.reserve(5, 1024, Priority.INTERACTIVE, free_slots=3)
    with pytest.raises(QueueFullError) as info:
        control.reserve(5, 1024, Priority.INTERACTIVE, free_slots=3)
    assert "limit is 2 requests beyond the 3 free batch slots" in info.value.message
    with pytest.raises(QueueFullError):
        control.reserve(5, 1024, Priority.INTERACTIVE)   # no free slots: the plain bound


def test_a_burst_as_large_as_the_batch_is_admitted(tiny_model_path):
    # Regression: 128 clients against max_batch_size 128 got 429s, because requests waiting
    # only for their prefill counted against max_waiting_requests.
    eng = make_engine(tiny_model_path, max_batch_size=8, prefill_batch_size=2,
                      max_waiting_requests=1)
    try:
        async def go():
            streams = [eng.submit(prompt_request(3)) for _ in range(9)]   # 8 slots + 1 queued
            with pytest.raises(QueueFullError):
                for _ in range(8):   # the engine thread may admit some meanwhile
                    streams.append(eng.submit(prompt_request(3)))
            return [await drain(s) for s in streams]

        outs = run(go())
        assert len(outs) >= 9
        assert all(o.final.finish_reason is FinishReason.LENGTH for o in outs)
    finally:
        eng.shutdown()


def test_retry_after_grows_with_the_work_ahead():
    control = AdmissionControl(EngineConfig(max_waiting_requests=100), kv_budget_bytes=2**30)
    for _ in range(10):   # ten requests left the queue for the batch just now
        control.reserve(5, 1024, Priority.INTERACTIVE)
        control.release(5, 1024, Priority.INTERACTIVE, admitted=True)
    for _ in range(100):
        control.reserve(5, 1024, Priority.INTERACTIVE)

    def refusal(scale: float) -> QueueFullError:
        control.update(scale=scale)
        with pytest.raises(QueueFullError) as info:
            control.reserve(5, 1024, Priority.INTERACTIVE)
        return info.value

    half, three_quarters = refusal(0.5), refusal(0.75)   # 51 and 26 requests too many
    assert half.retry_after > three_quarters.retry_after > 1.0
    assert half.retry_after / three_quarters.retry_after == pytest.approx(51 / 26)
    assert control.rejected == 2 and control.queued.requests == 100


def test_shed_batch_refuses_only_batch_requests(tiny_model_path):
    eng = make_engine(tiny_model_path)
    try:
        assert eng.set_admission(shed_batch=True).shed_batch

        async def go():
            with pytest.raises(LoadShedError) as info:
                eng.submit(prompt_request(3, priority=BATCH))
            interactive = await drain(eng.submit(prompt_request(3)))
            return info.value, interactive

        err, interactive = run(go())
        assert err.code == "load_shed" and isinstance(err, QueueFullError)
        assert err.limit == "shed_batch" and 1.0 <= err.retry_after <= 60.0
        assert interactive.final.finish_reason is FinishReason.LENGTH
        stats = eng.stats()
        assert (stats.rejected, stats.shed_batch) == (1, True)

        eng.set_admission(shed_batch=False)
        out = run(submit_and_drain(eng, prompt_request(3, priority=BATCH)))
        assert out.final.finish_reason is FinishReason.LENGTH
        assert eng.stats().rejected == 1
    finally:
        eng.shutdown()


def test_queue_stats_count_tokens_and_batch_class(tiny_model_path):
    eng = make_engine(tiny_model_path, max_batch_size=1)
    try:
        async def go():
            async with slot_taken(eng):
                streams = [eng.submit(prompt_request(7, priority=BATCH)),
                           eng.submit(prompt_request(11)),
                           eng.submit(prompt_request(13, priority=BATCH))]
                stats = eng.stats()
            for s in streams:
                await drain(s)
            return stats

        stats = run(go())
        assert (stats.waiting, stats.waiting_tokens, stats.waiting_batch) == (3, 31, 2)
        after = eng.stats()
        assert (after.waiting_tokens, after.waiting_batch) == (0, 0)
        assert (after.rejected, after.expired, after.preempted) == (0, 0, 0)
    finally:
        eng.shutdown()


# -- in a child process --------------------------------------------------------------------------
def test_engine_process_admission_and_deadline(tiny_model_path):
    eng = EngineProcess(EngineConfig(models=[ModelConfig(name="tiny", path=str(tiny_model_path))]))
    try:
        assert eng.admission() == AdmissionSettings()
        assert eng.set_admission(scale=0.25, shed_batch=True) == AdmissionSettings(0.25, True)
        assert eng.admission() == AdmissionSettings(0.25, True)
        with pytest.raises(InvalidRequestError):
            eng.set_admission(scale=2.0)

        async def go():
            with pytest.raises(LoadShedError):
                await eng.submit(prompt_request(3, priority=BATCH))
            out = Collected()
            async for delta in eng.generate(request("go on", max_tokens=100_000, timeout_s=0.5)):
                out.token_ids += delta.token_ids
                out.final = delta
            return out

        out = run(go())
        assert out.final.error_code == "deadline_exceeded"
        assert out.final.usage.completion_tokens == len(out.token_ids) > 0
        stats = eng.stats()
        assert (stats.expired, stats.rejected, stats.shed_batch, stats.admission_scale) == (
            1, 1, True, 0.25)
        assert stats.running == 0 and stats.kv_reserved_bytes == 0
    finally:
        eng.shutdown()
