"""Helpers shared by the engine tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from mlx_serving.engine import Engine, GenerationRequest, RequestOutput, SamplingParams


@dataclass
class Collected:
    """Everything one request produced, deltas concatenated."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    deltas: int = 0
    final: RequestOutput | None = None


async def collect(engine: Engine, request: GenerationRequest,
                  started: asyncio.Event | None = None) -> Collected:
    """Run a request to the end; ``started`` is set when its first delta arrives."""
    out = Collected()
    async for delta in engine.generate(request):
        if started is not None:
            started.set()
        out.deltas += 1
        out.text += delta.text
        out.token_ids += delta.token_ids
        out.logprobs += delta.logprobs or []
        if delta.finished:
            out.final = delta
    return out


def chat(content: str, **params) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": content}],
                             params=SamplingParams(**params))


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.005) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


async def async_wait_until(predicate, timeout: float = 30.0, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)
