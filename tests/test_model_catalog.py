"""The Router's model catalog in front of a real LLMServer (outside Serve): a variant that
serves no model yet answers 503 with Retry-After, never 404. ``InProcessHandle`` gives the
replica a Serve handle's call shape (``handle.method.remote(...)``)."""

from __future__ import annotations

import asyncio

import pytest

from mlx_serving.deployments.catalog import ModelCatalog
from mlx_serving.deployments.errors import HTTPError
from mlx_serving.deployments.llm_server import LLMServer
from mlx_serving.engine import ModelConfig


class InProcessHandle:
    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        method = getattr(self._target, name)

        class Call:
            @staticmethod
            async def remote(*args, **kwargs):
                return method(*args, **kwargs)

        return Call


@pytest.fixture
def empty_server():
    server = LLMServer.func_or_class("stable", {"models": []})
    yield server
    server.engine.shutdown()


def test_a_variant_without_a_model_is_503_until_its_model_is_loaded(empty_server,
                                                                    tiny_model_path):
    catalog = ModelCatalog({"stable": InProcessHandle(empty_server)})

    with pytest.raises(HTTPError) as refused:
        asyncio.run(catalog.require("stable"))
    assert (refused.value.status, refused.value.code) == (503, "no_model_loaded")
    assert refused.value.headers() == {"Retry-After": "1"}
    assert asyncio.run(catalog.models("stable")) == []   # /v1/models: an empty list

    # The empty answer was not kept: the next request sees the model at once.
    empty_server.engine.load_model(ModelConfig(name="demo", path=str(tiny_model_path),
                                               warmup=False))
    assert asyncio.run(catalog.require("stable")) == ["demo"]
