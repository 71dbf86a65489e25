"""RequestStream: the engine thread's deltas reach one asyncio reader, coalesced."""

from __future__ import annotations

import asyncio
import threading

from mlx_serving.engine.outputs import FinishReason, RequestOutput
from mlx_serving.engine.stream import RequestStream, wake


def _push_from_engine_thread(stream: RequestStream, delta: RequestOutput) -> None:
    """What the engine thread does: push, then wake the reader if push asks for it."""
    def push():
        if stream.push(delta):
            wake([stream])
    thread = threading.Thread(target=push)
    thread.start()
    thread.join()


def _delta(text: str, final: bool = False) -> RequestOutput:
    delta = RequestOutput("r1", text, [1])
    if final:
        delta.finish_reason = FinishReason.LENGTH
    return delta


def test_deltas_pushed_before_a_read_coalesce_into_one():
    async def go():
        stream = RequestStream("r1", asyncio.get_running_loop(), lambda _: None)
        for text in ("a", "b", "c"):
            _push_from_engine_thread(stream, _delta(text))
        _push_from_engine_thread(stream, _delta("d", final=True))
        return [d async for d in stream]

    deltas = asyncio.run(go())
    assert [(d.text, d.token_ids, d.finished) for d in deltas] == [("abcd", [1, 1, 1, 1], True)]


def test_hold_lets_deltas_coalesce_but_ends_when_the_final_one_arrives():
    """The replica holds a stream between chunks (its chunk interval); a request's last
    chunk must not wait for the rest of that interval."""
    async def go():
        stream = RequestStream("r1", asyncio.get_running_loop(), lambda _: None)
        _push_from_engine_thread(stream, _delta("a"))
        first = await stream.__anext__()
        hold = asyncio.create_task(stream.hold(30.0))
        _push_from_engine_thread(stream, _delta("b"))
        await asyncio.sleep(0.1)
        held_on_a_token = not hold.done()
        _push_from_engine_thread(stream, _delta("c", final=True))
        await asyncio.wait_for(hold, timeout=10)   # far less than the 30 s asked for
        rest = [d async for d in stream]
        return first, held_on_a_token, rest

    first, held_on_a_token, rest = asyncio.run(go())
    assert first.text == "a" and held_on_a_token
    assert [(d.text, d.finished) for d in rest] == [("bc", True)]


def test_hold_after_the_final_delta_is_pending_returns_at_once():
    async def go():
        stream = RequestStream("r1", asyncio.get_running_loop(), lambda _: None)
        _push_from_engine_thread(stream, _delta("a", final=True))
        await asyncio.sleep(0)   # the wake-up runs
        await asyncio.wait_for(stream.hold(30.0), timeout=10)
        return [d.text async for d in stream]

    assert asyncio.run(go()) == ["a"]
