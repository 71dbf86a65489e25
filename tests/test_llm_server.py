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


@pytest.mark.parametrize("after, served", [(0, 0), (3, 3), (100, 8)])
def test_injected_aborts_come_before_the_first_token_or_after_some(server, after, served):
    """``fault.abort_after_tokens``: 0 fails the request before its first token; N fails it
    once N tokens have gone out; a request that ends first is served whole."""
    from support import wait_until

    from mlx_serving.deployments.llm_server import InjectedFaultError
    from mlx_serving.deployments.settings import ServerSettings

    server.reconfigure({"fault": {"abort_percent": 100, "abort_after_tokens": after},
                        "chunk_interval_ms": 0})
    sent = []

    async def consume():
        req = GenerationRequest(prompt="Hello", params=SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True))
        async for chunk in server.generate(req):
            sent.append(chunk)

    try:
        if served == 8:
            asyncio.run(consume())
            assert sent[-1].finish_reason == "length"
        else:
            with pytest.raises(InjectedFaultError):
                asyncio.run(consume())
            assert not any(c.finish_reason for c in sent)
        tokens = sum(c.num_tokens for c in sent)
        assert tokens == served if after in (0, 100) else served <= tokens < 8
    finally:
        server.reconfigure(ServerSettings().model_dump())
    wait_until(lambda: server.engine.stats().running == 0, timeout=10)   # a cancel is async


def engine_samples(server) -> dict[str, float]:
    """The replica's engine metrics as /metrics gives them, by sample name."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from mlx_serving.deployments.llm_server import _EngineCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(server))
    return {s.name: s.value for f in text_string_to_metric_families(
        generate_latest(registry).decode()) for s in f.samples}


def test_time_in_flight_is_exported_as_serve_and_the_engine_count_it(server):
    """Serve counts a request at its replica for as long as the replica's stream lasts, the
    engine from submit to the request's end: /metrics sums both over the ended requests
    (÷ wall time: the mean number in flight, as routing sees it and as the engine does),
    and the stream encloses the engine's part."""
    names = ("mlx_serving:request_replica_seconds_total",
             "mlx_serving:request_engine_seconds_total")
    before = engine_samples(server)
    asyncio.run(run(server, request()))
    after = engine_samples(server)
    in_replica, in_engine = (after[n] - before[n] for n in names)
    assert 0 < in_engine <= in_replica


def test_engine_thread_time_is_exported_by_activity(server):
    """/metrics splits the engine thread's time by activity, and the busy ones add up to no
    more than the wall time they cover (an idle wait is counted when it ends, so it may
    have begun before)."""
    import time

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from mlx_serving.deployments.llm_server import _EngineCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(server))

    def thread_seconds() -> dict[str, float]:
        text = generate_latest(registry).decode()
        family = next(f for f in text_string_to_metric_families(text)
                      if f.name == "mlx_serving:engine_thread_seconds")
        return {s.labels["activity"]: s.value for s in family.samples
                if s.name.endswith("_total")}

    before, started = thread_seconds(), time.perf_counter()
    asyncio.run(run(server, request()))
    after, wall = thread_seconds(), time.perf_counter() - started
    spent = {k: after[k] - before[k] for k in after}
    assert set(spent) == {"prefill", "decode", "join", "admit", "release", "tokens", "idle"}
    assert all(spent[k] > 0 for k in ("prefill", "decode", "join", "admit", "tokens")), spent
    assert sum(v for k, v in spent.items() if k != "idle") <= wall * 1.05 + 0.05


def test_engine_thread_and_process_cpu_time_are_exported(server):
    """/metrics carries the engine thread's CPU time and its process's: a request costs the
    thread some CPU, never more than the wall time it took, and its process some too."""
    import time

    names = ("mlx_serving:engine_thread_cpu_seconds_total",
             "mlx_serving:engine_process_cpu_seconds_total")
    before, started = engine_samples(server), time.perf_counter()
    asyncio.run(run(server, request()))
    after, wall = engine_samples(server), time.perf_counter() - started
    thread, process = (after[n] - before[n] for n in names)
    assert 0 < thread <= wall + 0.05
    assert process > 0
