"""EngineProcess: the engine in a child process, against the same engine in this one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from support import Collected, async_wait_until, chat, collect, wait_until

from mlx_serving.engine import (
    ContextLengthExceededError,
    Engine,
    EngineClosedError,
    EngineConfig,
    EngineError,
    EngineProcess,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    ModelConfig,
    ModelNotFoundError,
    SamplingParams,
)
from mlx_serving.engine.process_wire import Deltas

BUFFER_TOKENS = 8
STALL_S = 3.0


def config(path, **settings) -> EngineConfig:
    return EngineConfig(models=[ModelConfig(name="tiny", path=str(path))], **settings)


@pytest.fixture(scope="module")
def proc(tiny_model_path):
    # A small stream buffer, so that readers lag behind it easily.
    eng = EngineProcess(config(tiny_model_path, stream_buffer_tokens=BUFFER_TOKENS,
                               stalled_reader_timeout_s=STALL_S))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def local(tiny_model_path):
    eng = Engine(config(tiny_model_path))
    yield eng
    eng.shutdown()


def run(coro):
    return asyncio.run(coro)


def long_request(**params) -> GenerationRequest:
    return chat("Go on forever", max_tokens=100_000, temperature=0, ignore_eos=True, **params)


async def read_a_little(stream, tokens: int = 3) -> int:
    received = 0
    async for delta in stream:
        received += len(delta.token_ids)
        if received >= tokens:
            break
    return received


# -- output ---------------------------------------------------------------------------------------
REQUESTS = [
    chat("Tell me about continuous batching.", max_tokens=40, temperature=0, ignore_eos=True),
    chat("Write a short poem about the sea", max_tokens=64, temperature=0),
    chat("Once upon a time", max_tokens=48, temperature=0, ignore_eos=True, stop=["the", "a"]),
    chat("Greedy with logprobs", max_tokens=16, temperature=0, logprobs=True, top_logprobs=3),
    chat("Seeded", max_tokens=30, temperature=0.9, seed=7, ignore_eos=True),
    GenerationRequest(prompt=list(range(5, 60)),
                      params=SamplingParams(max_tokens=33, temperature=0, ignore_eos=True)),
    GenerationRequest(prompt="def fibonacci(n):",
                      params=SamplingParams(max_tokens=25, temperature=0, stop_token_ids=[7])),
]


def test_concurrent_streams_match_the_in_process_engine(proc, local):
    async def all_of(eng) -> list[Collected]:
        return await asyncio.gather(*(collect(eng, r) for r in REQUESTS))

    remote, here = run(all_of(proc)), run(all_of(local))
    for r, h in zip(remote, here):
        assert r.token_ids == h.token_ids and len(r.token_ids) > 0
        assert r.text == h.text
        assert r.final.finish_reason is h.final.finish_reason
        assert r.final.usage == h.final.usage
        assert [lp.token_id for lp in r.logprobs] == [lp.token_id for lp in h.logprobs]
        # The two engines may batch the concurrent prompts differently (the child's arrive
        # over a pipe), which changes float32 reduction order: 1.2e-5 apart on a logprob of
        # -2.84 was seen (CI). A wrong token or position would be off by far more.
        assert [lp.logprob for lp in r.logprobs] == pytest.approx(
            [lp.logprob for lp in h.logprobs], abs=1e-4)
    assert remote[3].logprobs and len(remote[3].logprobs[0].top) == 3


def test_one_message_per_engine_turn(proc, monkeypatch):
    messages = []
    dispatch = proc._dispatch

    def counting(msg):
        if isinstance(msg, Deltas):
            messages.append(len(msg.items))
        dispatch(msg)

    monkeypatch.setattr(proc, "_dispatch", counting)
    steps = proc.stats().steps
    requests = [chat(f"stream {i}", max_tokens=40, temperature=0, ignore_eos=True)
                for i in range(8)]

    async def go():
        return await asyncio.gather(*(collect(proc, r) for r in requests))

    outs = run(go())
    steps = proc.stats().steps - steps
    assert all(len(o.token_ids) == 40 for o in outs)
    assert len(messages) <= steps    # at most one message per engine turn...
    assert max(messages) == 8        # ...carrying the deltas of every stream


def test_models_and_tokenizer(proc, local):
    def described(infos):
        return [(i.name, i.path, i.context_length, i.vocab_size, i.kv_bytes_per_token) for i in infos]

    assert described(proc.list_models()) == described(local.list_models())
    request = chat("Hello there")
    assert proc.model("tiny").prompt_ids(request) == local.model("tiny").prompt_ids(request)
    assert proc.model(None).tokenizer.decode([5, 6, 7]) == local.model(None).tokenizer.decode([5, 6, 7])
    with pytest.raises(InvalidRequestError) as info:
        proc.model(None).check_token_ids([1, 10**6], "tokens")
    assert info.value.param == "tokens"
    with pytest.raises(ModelNotFoundError):
        proc.model("nope")


# -- errors --------------------------------------------------------------------------------------
BAD_REQUESTS = [
    GenerationRequest(prompt=[1, 2, -3]),
    GenerationRequest(prompt="hi", params=SamplingParams(stop_token_ids=[10**7])),
    GenerationRequest(prompt="hi", params=SamplingParams(logit_bias={10**7: 1.0})),
    GenerationRequest(prompt="hi", model="nope"),
    GenerationRequest(prompt="hi", params=SamplingParams(max_tokens=200_000)),
    GenerationRequest(prompt=[]),
]


def test_invalid_requests_raise_the_same_typed_errors(proc, local):
    async def go() -> list[tuple[type, str | None, str]]:
        errors = []
        for request in BAD_REQUESTS:
            with pytest.raises(EngineError) as theirs:
                local.submit(request)
            with pytest.raises(EngineError) as mine:
                await proc.submit(request)
            errors.append((type(mine.value), mine.value.param, mine.value.message))
            assert errors[-1] == (type(theirs.value), theirs.value.param, theirs.value.message)
        return errors

    errors = run(go())
    assert {kind for kind, _, _ in errors} == {
        InvalidRequestError, ModelNotFoundError, ContextLengthExceededError}
    assert proc.stats().waiting == 0


def test_request_id_in_use(proc):
    async def go():
        first = await proc.submit(long_request())
        with pytest.raises(InvalidRequestError) as info:
            await proc.submit(GenerationRequest(request_id=first.request_id, prompt="hi"))
        first.cancel()
        return info.value

    assert run(go()).param == "request_id"
    wait_until(lambda: proc.stats().running == 0)


# -- cancellation and backpressure ------------------------------------------------------------------
def test_cancel_frees_the_sequence(proc):
    async def go():
        gen = proc.generate(long_request())
        await read_a_little(gen)
        assert proc.stats().running == 1
        await gen.aclose()  # what a vanished HTTP client does

    run(go())
    wait_until(lambda: proc.stats().running == 0)
    stats = proc.stats()
    assert (stats.waiting, stats.running, stats.paused, stats.in_batch) == (0, 0, 0, 0)
    assert stats.kv_reserved_bytes == 0


def test_slow_reader_is_paused_in_the_child_and_gets_every_token(proc):
    request = chat("Tell a long story", max_tokens=60, temperature=0, ignore_eos=True)

    async def read_slowly():
        tokens = []
        async for delta in proc.generate(request):
            tokens += delta.token_ids
            await asyncio.sleep(0.05)  # the engine makes far more than BUFFER_TOKENS meanwhile
        return tokens

    pauses = proc.stats().pauses
    fast = run(collect(proc, request)).token_ids
    assert run(read_slowly()) == fast and len(fast) == 60
    assert proc.stats().pauses > pauses


def test_reader_that_never_reads_is_paused_then_ended(proc):
    async def go():
        stream = await proc.submit(long_request())
        await async_wait_until(lambda: proc.stats().paused == 1)
        paused_at = time.monotonic()
        await async_wait_until(lambda: proc.stats().paused == 0, timeout=STALL_S + 10)
        deltas = [d async for d in stream]
        return deltas, time.monotonic() - paused_at

    deltas, waited = run(go())
    tokens = sum(len(d.token_ids) for d in deltas)
    assert BUFFER_TOKENS <= tokens <= BUFFER_TOKENS + 2  # this process buffered no more
    # The buffered tokens and the final delta may arrive as one or two deltas: the child's
    # stats answer (paused == 0) can overtake the message that carries the final delta.
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert len(deltas) <= 2
    assert deltas[-1].error_code == "reader_stalled"
    assert deltas[-1].usage.completion_tokens == tokens
    assert waited < STALL_S + 2
    assert proc.stats().kv_reserved_bytes == 0


# -- failure and shutdown ------------------------------------------------------------------------------
def test_killed_child_ends_streams_with_an_error(tiny_model_path):
    eng = EngineProcess(config(tiny_model_path))
    try:
        async def go():
            streams = [await eng.submit(long_request()) for _ in range(2)]
            received = [await read_a_little(s) for s in streams]
            os.kill(eng.pid, signal.SIGKILL)
            finals = [[d async for d in s][-1] for s in streams]
            with pytest.raises(EngineClosedError):
                await eng.submit(chat("anyone there?"))
            return received, finals

        received, finals = run(go())
        for final, before in zip(finals, received):
            assert final.finish_reason is FinishReason.ERROR
            assert final.error_code == "engine_closed" and "exit code -9" in final.error
            assert final.usage.completion_tokens >= before
        assert not eng.is_healthy() and eng.exitcode == -signal.SIGKILL
        with pytest.raises(EngineClosedError):
            eng.stats()
    finally:
        eng.shutdown()
    eng.shutdown()  # idempotent


def test_shutdown_drains_a_running_request(tiny_model_path):
    eng = EngineProcess(config(tiny_model_path))
    out = run(_drain(eng))
    assert out.final.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 100
    assert eng.exitcode == 0 and not eng.is_healthy()
    with pytest.raises(EngineClosedError):
        run(eng.submit(chat("after")))


async def _drain(eng: EngineProcess) -> Collected:
    """Read a request while the engine shuts down with a drain, started after its first delta."""
    stream = await eng.submit(chat("Drain me", max_tokens=100, temperature=0, ignore_eos=True))
    out, stopping = Collected(), None
    async for delta in stream:
        out.token_ids += delta.token_ids
        out.final = delta
        if stopping is None:
            stopping = asyncio.create_task(asyncio.to_thread(eng.shutdown, 30.0))
            await async_wait_until(lambda: not eng._accepting)
            with pytest.raises(EngineClosedError):  # no new requests while draining
                await eng.submit(chat("too late"))
    await stopping
    return out


SCRIPT = """
import asyncio, atexit, os, signal, sys
atexit.register(lambda: print("child exit code", eng.exitcode, flush=True))  # runs last
from mlx_serving.engine import *

async def main():
    async for _ in eng.generate(GenerationRequest(prompt="hi", params=SamplingParams(max_tokens=3))):
        pass

if __name__ == "__main__":
    eng = EngineProcess(EngineConfig(models=[ModelConfig(name="m", path=sys.argv[1])]))
    asyncio.run(main())
    print("child pid", eng.pid, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def _exited(pid: int) -> bool:
    if not os.path.isdir("/proc"):  # macOS
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"   # a zombie nobody reaped yet
    except FileNotFoundError:
        return True


def test_exit_at_interpreter_exit_and_when_the_parent_dies(tiny_model_path, tmp_path):
    script = tmp_path / "use_engine_process.py"
    script.write_text(SCRIPT)
    atexit = subprocess.run([sys.executable, str(script), str(tiny_model_path), "atexit"],
                            capture_output=True, text=True, timeout=120)
    assert atexit.returncode == 0, atexit.stderr[-2000:]
    assert "child exit code 0" in atexit.stdout and "terminate called" not in atexit.stderr

    died = subprocess.run([sys.executable, str(script), str(tiny_model_path), "die"],
                          capture_output=True, text=True, timeout=120)
    assert died.returncode == -signal.SIGKILL
    child = int(died.stdout.split("child pid")[1].split()[0])
    wait_until(lambda: _exited(child), timeout=10)
