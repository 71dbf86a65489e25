"""The public face of the engine: load models, submit requests, stream their output.

The engine knows nothing of Ray or HTTP. It is used from asyncio code::

    engine = Engine(EngineConfig(models=[ModelConfig(name="demo", path="models/demo")]))
    request = GenerationRequest(messages=[{"role": "user", "content": "Hi"}],
                                params=SamplingParams(max_tokens=32, temperature=0))
    async for delta in engine.generate(request):
        print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
import atexit
import os
import time
import weakref
from dataclasses import dataclass
from typing import AsyncIterator

import mlx.core as mx

from mlx_serving.engine.admission import AdmissionSettings
from mlx_serving.engine.config import EngineConfig, ModelConfig
from mlx_serving.engine.cuda_backend import choose_cudnn_attention, set_cache_limit
from mlx_serving.engine.errors import EngineClosedError, InvalidRequestError, ModelNotFoundError
from mlx_serving.engine.model import LoadedModel, ModelInfo, pick_model
from mlx_serving.engine.outputs import RequestOutput
from mlx_serving.engine.params import GenerationRequest
from mlx_serving.engine.runner import ModelRunner
from mlx_serving.engine.scheduler import Scheduler
from mlx_serving.engine.sequence import Sequence, kv_reservation
from mlx_serving.engine.stream import RequestStream, StreamFactory
from mlx_serving.engine.warmup import warm_up


@dataclass
class EngineStats:
    """A snapshot of the engine's load (read without stopping the engine thread)."""

    waiting: int
    running: int
    paused: int
    in_batch: int   # sequences mlx-lm's BatchGenerator itself holds
    kv_reserved_bytes: int
    kv_budget_bytes: int
    prefix_cache_bytes: int
    prefix_cache_hits: int
    prefix_cache_misses: int
    steps: int
    prefill_steps: int  # steps that also processed prompt tokens
    prefill_s: float    # time in prompt processing (mlx-lm's BatchGenerator counters); the
                        # host's part: the device's part delays the next decode step
    decode_s: float     # time in decode steps
    # the engine thread's time outside those two (see SchedulerCounters, HostTimes)
    join_s: float       # BatchGenerator's steps beyond them: prefilled sequences joining
    admit_s: float      # putting sequences into the batch
    release_s: float    # taking them out
    tokens_s: float     # handing each step's tokens to their requests
    idle_s: float       # waiting for work
    thread_cpu_s: float   # the engine thread's CPU time: ÷ its busy wall time well under 1
                          # means a thread that waits (its core, the interpreter lock, the device)
    process_cpu_s: float  # the engine's whole process (its other threads, e.g. a child
                          # engine's output forwarding, share the interpreter lock)
    generated_tokens: int
    finished: int       # requests ended, for whatever reason
    queued_s: float     # their summed time from submit to admission into the batch,
    ttft_s: float       # and from submit to the first token (the engine's share of TTFT),
    request_s: float    # and from submit to their end (÷ wall time: requests in the engine)
    to_decode_s: float  # and from admission to joining the decode batch (prompt pass done),
    to_decode_steps: int  # the same in engine steps,
    to_token_steps: int   # and engine steps from joining to the first token
    pauses: int     # times a sequence was paused because its reader lagged
    active_memory_bytes: int
    cache_memory_bytes: int   # freed buffers MLX keeps for reuse (mlx_cache_limit_bytes)
    waiting_tokens: int    # prompt tokens of the queued requests
    waiting_batch: int     # batch-class requests among them
    rejected: int          # submissions admission control refused (load shedding included)
    expired: int           # requests ended by their deadline
    preempted: int         # times a batch-class sequence made room for an interactive one
    admission_scale: float  # the live multiplier of the queue bounds (Engine.set_admission)
    shed_batch: bool        # batch-class requests are refused


def default_memory_bytes() -> int:
    """The accelerator's memory where MLX reports it, else the machine's RAM."""
    info = mx.device_info()
    size = info.get("memory_size") or info.get("total_memory")
    if size:
        return int(size)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _shutdown_engines() -> None:
    # MLX arrays last evaluated on a thread that has exited abort the process if they are
    # freed during interpreter teardown: release every engine's models before that.
    for engine in list(_ENGINES):
        engine.shutdown()


class Engine:
    """A single-node MLX inference engine with continuous batching.

    One scheduler thread owns every MLX call; callers on any event loop submit requests and
    iterate their output deltas.
    """

    def __init__(self, config: EngineConfig):
        self.config = config
        choose_cudnn_attention(config.cudnn_attention)  # before any model runs
        memory = default_memory_bytes()
        set_cache_limit(config.mlx_cache_limit_bytes, memory)
        budget = config.kv_memory_bytes or int(memory * config.kv_memory_fraction)
        self._scheduler = Scheduler(config, budget)
        self._models: dict[str, LoadedModel] = {}
        self._accepting = True
        self._scheduler.start()
        _ENGINES.add(self)
        for model in config.models:
            self.load_model(model)

    # -- models ----------------------------------------------------------------------------------
    def load_model(self, model: ModelConfig) -> ModelInfo:
        """Load (and warm up) a model on the engine thread; blocks until it is ready."""
        if model.name in self._models:
            raise InvalidRequestError(f"model {model.name!r} is already loaded", param="name")

        def load() -> LoadedModel:
            loaded = LoadedModel(model)
            runner = ModelRunner(loaded, self.config)
            if model.warmup:
                warm_up(runner)
            self._scheduler.runners[model.name] = runner  # on the engine thread
            return loaded

        loaded = self._scheduler.call(load).result()
        self._models[model.name] = loaded
        return loaded.info()

    def unload_model(self, name: str) -> None:
        """Unload a model; its waiting requests end with an error, running ones are cancelled."""
        if name not in self._models:
            raise ModelNotFoundError(f"model {name!r} is not loaded", param="model")
        del self._models[name]

        self._scheduler.call(lambda: self._scheduler.remove_runner(name)).result()

    def list_models(self) -> list[ModelInfo]:
        return [m.info() for m in self._models.values()]

    def model(self, name: str | None) -> LoadedModel:
        """The loaded model a request names (None: the only one loaded)."""
        return pick_model(self._models, name)

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest,
               make_stream: StreamFactory = RequestStream) -> RequestStream:
        """Validate and queue a request; returns the stream of its output deltas.

        Must be called from a running event loop. Raises the engine's typed errors for
        invalid input (before anything is queued) and QueueFullError under overload.
        ``make_stream`` is for callers that forward the deltas elsewhere (``EngineProcess``).
        """
        self._check_open()
        loaded = self.model(request.model)
        prompt_ids = loaded.prompt_ids(request)
        max_tokens = loaded.resolve_max_tokens(request, len(prompt_ids), self.config.default_max_tokens)
        params = request.params
        if params.top_k >= loaded.vocab_size:   # keeps every token: the same as no top-k
            params = params.model_copy(update={"top_k": 0})
            request = request.model_copy(update={"params": params})
        loaded.check_token_ids(params.stop_token_ids, "stop_token_ids")
        if params.logit_bias:
            loaded.check_token_ids(list(params.logit_bias), "logit_bias")
        kv_bytes = kv_reservation(loaded.kv_bytes_per_token, len(prompt_ids) + max_tokens)
        if kv_bytes > self._scheduler.kv_budget_bytes:
            raise InvalidRequestError(
                f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) needs "
                f"{kv_bytes} bytes of KV cache; the engine's budget is "
                f"{self._scheduler.kv_budget_bytes}", param="max_tokens")
        stream = make_stream(request.request_id, asyncio.get_running_loop(), self._scheduler.cancel)
        seq = Sequence(request=request, model_name=loaded.name, prompt_ids=prompt_ids,
                       max_tokens=max_tokens, stream=stream, kv_bytes=kv_bytes,
                       kv_bytes_per_token=loaded.kv_bytes_per_token)
        try:
            self._scheduler.enqueue(seq)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="request_id") from None
        return stream

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its deltas; leaving the loop early cancels it."""
        stream = self.submit(request)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.cancel()

    def cancel(self, request_id: str) -> None:
        self._scheduler.cancel(request_id)

    # -- admission ---------------------------------------------------------------------------------
    def set_admission(self, scale: float | None = None,
                      shed_batch: bool | None = None) -> AdmissionSettings:
        """Turn admission control live; None keeps a setting. Returns the new settings.

        ``scale`` (0 < scale <= 1) multiplies every queue bound (max_waiting_requests,
        max_waiting_tokens, max_waiting_kv_fraction); ``shed_batch`` refuses batch-class
        requests with LoadShedError. Requests already queued stay queued.
        """
        return self._scheduler.admission.update(scale=scale, shed_batch=shed_batch)

    def admission(self) -> AdmissionSettings:
        """The current admission settings."""
        return self._scheduler.admission.settings

    # -- state ---------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self._scheduler
        runners = list(s.runners.values())
        queued, settings = s.admission.queued, s.admission.settings
        return EngineStats(
            waiting=queued.requests,
            running=s.num_running,
            paused=s.num_paused,
            in_batch=sum(r.sequences_in_batch() for r in runners),
            kv_reserved_bytes=s.kv_reserved_bytes,
            kv_budget_bytes=s.kv_budget_bytes,
            prefix_cache_bytes=sum(r.prefix_cache.nbytes for r in runners),
            prefix_cache_hits=sum(r.prefix_cache.stats.hits for r in runners),
            prefix_cache_misses=sum(r.prefix_cache.stats.misses for r in runners),
            steps=s.counters.steps,
            prefill_steps=s.counters.prefill_steps,
            prefill_s=sum(r.batch_times()[0] for r in runners),
            decode_s=sum(r.batch_times()[1] for r in runners),
            join_s=sum(r.host_times.join_s for r in runners),
            admit_s=sum(r.host_times.admit_s for r in runners),
            release_s=sum(r.host_times.release_s for r in runners),
            tokens_s=s.counters.tokens_s,
            idle_s=s.counters.idle_s,
            thread_cpu_s=s.counters.cpu_s,
            process_cpu_s=time.process_time(),
            generated_tokens=s.counters.generated_tokens,
            finished=s.counters.finished,
            queued_s=s.counters.queued_s,
            ttft_s=s.counters.ttft_s,
            request_s=s.counters.request_s,
            to_decode_s=s.counters.to_decode_s,
            to_decode_steps=s.counters.to_decode_steps,
            to_token_steps=s.counters.to_token_steps,
            pauses=s.counters.paused_total,
            active_memory_bytes=mx.get_active_memory(),
            cache_memory_bytes=mx.get_cache_memory(),
            waiting_tokens=queued.tokens,
            waiting_batch=queued.batch,
            rejected=s.admission.rejected,
            expired=s.counters.expired,
            preempted=s.counters.preempted,
            admission_scale=settings.scale,
            shed_batch=settings.shed_batch,
        )

    def is_healthy(self, stuck_after_s: float = 120.0) -> bool:
        """False when the engine thread has died or has not come round its loop for too long."""
        s = self._scheduler
        return s.alive and s.failure is None and time.monotonic() - s.heartbeat < stuck_after_s

    def _check_open(self) -> None:
        if not self._accepting:
            raise EngineClosedError("the engine is shutting down")
        if not self.is_healthy():
            raise EngineClosedError("the engine thread is not running")

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop admitting, let running requests finish for up to ``drain_timeout_s``, then stop.

        Requests still running afterwards end with finish_reason ``error``.
        """
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        s = self._scheduler
        while time.monotonic() < deadline and (s.num_running or s.num_waiting or s.num_paused):
            time.sleep(0.01)
        s.stop()
        s.join(timeout=30)
        self._models.clear()
