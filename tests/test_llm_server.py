"""LLMServer outside Serve: the QoS directive a request carries reaches the replica's engine."""

from __future__ import annotations

import asyncio

import pytest

from mlx_serving.deployments.llm_server import LLMServer
from mlx_serving.engine import GenerationRequest, LoadShedError, Priority, SamplingParams


@pytest.fixture(scope="module")
def server(tiny_model_path):
    replica = LLMServer.func_or_class(
        "stable", {"models": [{"name": "demo", "path": str(tiny_model_path)}]})
    yield replica
    replica.engine.shutdown()


def request(priority: Priority = Priority.INTERACTIVE) -> GenerationRequest:
    return GenerationRequest(prompt="Hello", priority=priority,
                             params=SamplingParams(max_tokens=4, temperature=0))


async def run(server, req, directive=None) -> list:
    return [chunk async for chunk in server.generate(req, directive)]


def test_a_directive_is_applied_to_the_engine_and_lifted_again(server):
    shed = {"shed_batch": True, "admission_scale": 0.5}
    chunks = asyncio.run(run(server, request(), shed))
    assert chunks[-1].finish_reason == "length"
    settings = server.engine.admission()
    assert (settings.scale, settings.shed_batch) == (0.5, True)

    with pytest.raises(LoadShedError):
        asyncio.run(run(server, request(Priority.BATCH), shed))

    asyncio.run(run(server, request(Priority.BATCH)))  # no directive: back to normal
    settings = server.engine.admission()
    assert (settings.scale, settings.shed_batch) == (1.0, False)
