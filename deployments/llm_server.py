"""LLMServer: one Serve replica owning one Engine (and its models) on one machine."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import random
import sys
import time
from typing import AsyncIterator

import ray
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray import serve

from mlx_serving.deployments.replica_routing import ROUTER_CLASS
from mlx_serving.deployments.settings import ServerSettings
from mlx_serving.deployments.telemetry import Reporter, replica_id, route_logs_to_serve
from mlx_serving.deployments.wire import Chunk, TokenInfo
from mlx_serving.engine import (Engine, EngineConfig, EngineProcess, GenerationRequest,
                                RequestOutput)
from mlx_serving.engine.blas import is_preloaded
from mlx_serving.engine.cuda_backend import gpu_available
from mlx_serving.engine.errors import EngineError

log = logging.getLogger(__name__)


class InjectedFaultError(EngineError):
    """A request failed on purpose by fault injection (see FaultConfig)."""

    code = "injected_fault"


@serve.deployment(
    name="LLMServer",
    max_ongoing_requests=64,
    max_queued_requests=256,
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=1,
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 0.5},
    # Each Router picks a replica on queue lengths it refreshes every 0.1 s, not Serve's
    # per-caller cache (replica_routing.py says why; docs/BENCHMARKS.md, run 18).
    request_router_config={"request_router_class": ROUTER_CLASS},
)
class LLMServer:
    """Serves one variant's models from one Engine; streams coalesced chunks to the Router."""

    def __init__(self, variant: str, engine: dict, telemetry=None,
                 engine_process: bool | None = None):
        route_logs_to_serve()
        self.variant = variant
        config = EngineConfig.model_validate(engine)
        if engine_process is None:   # see VariantConfig.engine_process
            engine_process = gpu_available()
        self.engine = EngineProcess(config) if engine_process else Engine(config)
        self.settings = ServerSettings()
        self.replica = replica_id()
        self._active = 0
        self.stream_seconds = 0.0  # summed over the streams served (see _EngineCollector)
        self._directive = (1.0, False)  # (admission scale, shed batch) applied to the engine
        log.info("LLMServer %s (%s) ready; GPUs %s; OpenBLAS preloaded: %s", self.replica,
                 variant, _gpu_ids(), is_preloaded())
        self._reporter = None
        if telemetry is not None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_EngineCollector(self))
            self._reporter = Reporter(telemetry, f"llm:{self.replica}", registry).start()

    def reconfigure(self, user_config: dict) -> None:
        """Apply live settings from ``user_config`` (see ServerSettings)."""
        self.settings = ServerSettings.model_validate(user_config or {})
        sys.setswitchinterval(self.settings.switch_interval_ms / 1000.0)

    def check_health(self) -> None:
        if not self.engine.is_healthy():
            raise RuntimeError("the engine thread is dead or stuck")

    async def generate(self, request: GenerationRequest,
                       directive: dict | None = None) -> AsyncIterator[Chunk]:
        """Run one request; yields chunks, each holding every token produced since the last.

        ``directive`` is the QoS monitor's current word for this variant, as the Router
        knows it (shed batch-class requests, scale the admission bounds); it reaches every
        replica with the traffic itself. Invalid requests and refused admissions raise the
        engine's typed errors before the first chunk.
        """
        called = time.monotonic()
        await self._apply_directive(directive or _NORMAL)
        abort_after = await self._inject_faults()
        stream = self.engine.submit(request)
        if inspect.isawaitable(stream):  # EngineProcess: the child validates the request
            stream = await stream
        tokenizer = self.engine.model(request.model).tokenizer
        self._active += 1
        log.info("request %s accepted", request.request_id,
                 extra={"engine_request_id": request.request_id, "variant": self.variant})
        last, sent = None, 0
        try:
            first = True
            async for delta in stream:
                chunk = _to_chunk(delta, tokenizer)
                if first:
                    chunk.replica, first = self.replica, False
                last = chunk
                yield chunk
                sent += chunk.num_tokens
                if abort_after is not None and sent >= abort_after and not delta.finished:
                    raise InjectedFaultError(f"fault injection: request aborted after {sent} "
                                             f"tokens on variant {self.variant!r}")
                if not delta.finished:   # coalesce, but never hold back the last chunk
                    await stream.hold(self._chunk_interval())
        finally:
            self._active -= 1
            self.stream_seconds += time.monotonic() - called
            stream.cancel()  # a no-op when finished; frees the sequence when the client left
            ended = last.finish_reason if last is not None and last.finished else "disconnected"
            log.info("request %s ended: %s", request.request_id, ended,
                     extra={"engine_request_id": request.request_id, "variant": self.variant,
                            "finish_reason": ended,
                            "error_code": last.error_code if last is not None else None,
                            "prompt_tokens": last.prompt_tokens if last is not None else 0,
                            "completion_tokens": (last.completion_tokens
                                                  if last is not None else 0)})

    async def _apply_directive(self, directive: dict) -> None:
        wanted = (float(directive.get("admission_scale", 1.0)),
                  bool(directive.get("shed_batch", False)))
        if wanted != self._directive:
            self._directive = wanted
            # A round trip when the engine runs in a child process: off the event loop.
            await asyncio.to_thread(self.engine.set_admission, scale=wanted[0],
                                    shed_batch=wanted[1])
            log.info("QoS directive applied: admission_scale=%g shed_batch=%s", *wanted)

    async def _inject_faults(self) -> int | None:
        """Apply the fault settings to one request: fail it now, or delay it; returns the
        tokens after which it is to fail mid-stream, if it is."""
        fault = self.settings.fault
        abort = fault.abort_percent and random.random() * 100 < fault.abort_percent
        if abort and not fault.abort_after_tokens:
            raise InjectedFaultError(f"fault injection: request aborted on variant {self.variant!r}")
        if fault.delay_ms and random.random() * 100 < fault.delay_percent:
            await asyncio.sleep(fault.delay_ms / 1000.0)
        return fault.abort_after_tokens if abort else None

    def _chunk_interval(self) -> float:
        s = self.settings
        return max(s.chunk_interval_ms / 1000.0, self._active / s.max_chunks_per_s)

    # -- small RPCs for the Router -------------------------------------------------------------------
    def models(self) -> list[dict]:
        return [{"id": m.name, "max_model_len": m.context_length} for m in self.engine.list_models()]

    def ready(self) -> bool:
        return bool(self.engine.list_models()) and self.engine.is_healthy()

    def stats(self) -> dict:
        """The engine's counters and load (``EngineStats`` as a dict)."""
        return dataclasses.asdict(self.engine.stats())

    def info(self) -> dict:
        """Where this replica runs: its process, the engine's process and niceness, its
        GPUs, its models."""
        engine_pid = self.engine.pid if isinstance(self.engine, EngineProcess) else os.getpid()
        return {"replica": self.replica, "variant": self.variant, "pid": os.getpid(),
                "engine_pid": engine_pid,
                "engine_niceness": os.getpriority(os.PRIO_PROCESS, engine_pid),
                "gpu_ids": _gpu_ids(),
                "openblas_preloaded": is_preloaded(),
                "models": self.models()}

    def tokenize(self, model: str | None, prompt: str | None, messages: list[dict] | None,
                 add_special_tokens: bool) -> list[int]:
        loaded = self.engine.model(model)
        if messages is not None:
            return loaded.prompt_ids(GenerationRequest(model=model, messages=messages))
        return loaded.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def detokenize(self, model: str | None, tokens: list[int]) -> str:
        loaded = self.engine.model(model)
        loaded.check_token_ids(tokens, "tokens")
        return loaded.tokenizer.decode(tokens)

    def __del__(self):
        # Serve has already waited for in-flight requests (graceful_shutdown_timeout_s).
        if self._reporter is not None:
            self._reporter.stop()
        self.engine.shutdown(drain_timeout_s=5.0)



_NORMAL = {"admission_scale": 1.0, "shed_batch": False}


def _gpu_ids() -> list[str]:
    """The GPUs Ray gave this replica (none outside Ray: asking would start a local Ray)."""
    return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []


def _to_chunk(delta: RequestOutput, tokenizer) -> Chunk:
    chunk = Chunk(text=delta.text, num_tokens=len(delta.token_ids))
    if delta.logprobs is not None:
        chunk.logprobs = [
            TokenInfo(tokenizer.decode([lp.token_id]), lp.logprob,
                      [(tokenizer.decode([t]), v) for t, v in lp.top])
            for lp in delta.logprobs]
    if delta.usage is not None:   # the first and the last delta
        chunk.prompt_tokens = delta.usage.prompt_tokens
        chunk.cached_tokens = delta.usage.cached_tokens
    if delta.finished:
        chunk.finish_reason = delta.finish_reason.value
        chunk.error, chunk.error_code = delta.error, delta.error_code
        chunk.completion_tokens = delta.usage.completion_tokens
    return chunk


class _EngineCollector:
    """Engine state as Prometheus metrics, read when the registry is collected."""

    def __init__(self, server: LLMServer):
        self._server = server

    def collect(self):
        s = self._server.engine.stats()
        labels = ["variant", "replica"]
        values = [self._server.variant, self._server.replica]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"mlx_serving:{name}", doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"mlx_serving:{name}", doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("num_requests_running", "Sequences in the batch.", s.running)
        yield gauge("num_requests_waiting", "Requests waiting for admission.", s.waiting)
        yield gauge("num_requests_paused", "Sequences paused for slow readers.", s.paused)
        yield gauge("num_requests_waiting_batch", "Batch-class requests waiting.",
                    s.waiting_batch)
        yield gauge("num_tokens_waiting", "Prompt tokens of the waiting requests.",
                    s.waiting_tokens)
        yield gauge("batch_size", "Sequences mlx-lm's BatchGenerator holds now.", s.in_batch)
        yield gauge("admission_scale", "Live multiplier of the admission bounds (QoS).",
                    s.admission_scale)
        yield gauge("shedding_batch", "1 while batch-class requests are refused (QoS).",
                    1.0 if s.shed_batch else 0.0)
        lookups = s.prefix_cache_hits + s.prefix_cache_misses
        yield gauge("prefix_cache_hit_rate", "Share of requests that reused a cached prefix.",
                    s.prefix_cache_hits / lookups if lookups else 0.0)
        yield gauge("kv_cache_reserved_bytes", "KV memory reserved by admitted requests.",
                    s.kv_reserved_bytes)
        yield gauge("kv_cache_budget_bytes", "KV memory budget.", s.kv_budget_bytes)
        yield gauge("prefix_cache_bytes", "Bytes held by the prefix cache.", s.prefix_cache_bytes)
        yield gauge("mlx_active_memory_bytes", "MLX active memory.", s.active_memory_bytes)
        yield gauge("mlx_cache_memory_bytes", "Freed buffers MLX keeps for reuse.",
                    s.cache_memory_bytes)
        yield gauge("engine_healthy", "1 while the engine thread runs.",
                    1.0 if self._server.engine.is_healthy() else 0.0)
        yield counter("prefix_cache_hits", "Requests that reused a cached prefix.",
                      s.prefix_cache_hits)
        yield counter("prefix_cache_misses", "Requests that found no cached prefix.",
                      s.prefix_cache_misses)
        yield counter("engine_steps", "Batch steps run.", s.steps)
        yield counter("engine_generation_tokens", "Tokens generated by the engine.",
                      s.generated_tokens)
        yield counter("requests_finished", "Requests the engine ended (any reason).",
                      s.finished)
        yield counter("request_queue_seconds", "Summed time of finished requests from "
                      "arrival at the engine to admission into the batch.", s.queued_s)
        yield counter("request_engine_ttft_seconds", "Summed time of finished requests from "
                      "arrival at the engine to their first token.", s.ttft_s)
        yield counter("request_engine_seconds", "Summed time of finished requests from arrival "
                      "at the engine to their end (÷ wall time: requests in the engine).",
                      s.request_s)
        yield counter("request_replica_seconds", "Summed time of the streams this replica "
                      "served, from the Router's call to the stream's end, which is how long "
                      "Serve counts each as ongoing here (÷ wall time: their mean number).",
                      self._server.stream_seconds)
        yield counter("request_to_decode_seconds", "Summed time of finished requests from "
                      "admission into the batch to joining its decode steps (prompt passed).",
                      s.to_decode_s)
        yield counter("request_to_decode_steps", "The same in engine steps.",
                      s.to_decode_steps)
        yield counter("request_to_token_steps", "Summed engine steps of finished requests from "
                      "joining the decode steps to their first token.", s.to_token_steps)
        yield counter("engine_pauses", "Sequences paused because their reader lagged.", s.pauses)
        thread = CounterMetricFamily(
            "mlx_serving:engine_thread_seconds", "The engine thread's time by activity: prompt "
            "passes, decode steps, prefilled sequences joining the decode batch, sequences "
            "entering and leaving the batch, token hand-off, idle.",
            labels=[*labels, "activity"])
        for activity, seconds in (("prefill", s.prefill_s), ("decode", s.decode_s),
                                  ("join", s.join_s), ("admit", s.admit_s),
                                  ("release", s.release_s), ("tokens", s.tokens_s),
                                  ("idle", s.idle_s)):
            thread.add_metric([*values, activity], seconds)
        yield thread
        yield counter("engine_thread_cpu_seconds", "The engine thread's CPU time (÷ its busy "
                      "wall time, engine_thread_seconds less idle: well under 1 is a thread "
                      "that waits for its core, the interpreter lock or the device).",
                      s.thread_cpu_s)
        yield counter("engine_process_cpu_seconds", "CPU time of the engine's process (a "
                      "child process on GPUs; else the replica's).", s.process_cpu_s)
        yield counter("admission_rejected", "Requests refused by admission control (429).",
                      s.rejected)
        yield counter("deadline_expired", "Requests ended by their deadline (timeout_s).",
                      s.expired)
        yield counter("preemptions", "Batch-class sequences paused for interactive ones.",
                      s.preempted)
