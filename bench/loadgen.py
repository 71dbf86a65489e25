"""The load generator every benchmark uses: streaming clients at a fixed concurrency or rate.

A ``Workload`` (seeded, so both sides of a comparison send identical prompts; more kinds
in ``mlx_serving.bench.workloads``) is driven by ``run_load`` against a ``Target``: an
OpenAI-compatible HTTP endpoint (``HttpTarget``) or an engine, in this process or a child
one (``EngineTarget``), closed-loop at a fixed concurrency or open-loop at a fixed request
rate. The result gives output tokens/s, requests/s and TTFT, inter-token and end-to-end
latency percentiles, and how busy the client was: one Python client saturates a core at
roughly 15k streamed chunks/s, so ``run_load`` can spread an HTTP level over several client
processes. From the command line::

    python -m mlx_serving.bench.loadgen --url http://127.0.0.1:8000 --model demo \\
        --concurrency 1 8 32 --requests 64 --prompt-tokens 128 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import signal
import sys
import time
import traceback
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Protocol

import httpx
import numpy as np

from mlx_serving.bench.host_cpu import HostCpuTimes

# The engine (and mlx-lm, 1.6 s to import) is imported only where a level drives an engine, not
# in the spawned load-client processes.
if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess
    from multiprocessing.synchronize import Event as ProcessEvent

    from mlx_serving.engine import Engine, EngineProcess, GenerationRequest

# Common English words: each is one token (with its leading space) in most BPE vocabularies.
_WORDS = """the of and to in is was for on that with as by at from his her they this had not
are but which have one were all their has been more when there can who out she would time
about into only other new some could these two may first then do any like my now over such
our man me even most made after also did many before must through back years where much your
way well down should because each just those people how too little state good very make world
still own see men work long here get both between life being under never day same another know
while last might great old year off come since against go came right used take three""".split()


def random_text(rng: random.Random, words: int) -> str:
    """``words`` common English words (about as many tokens in a BPE vocabulary)."""
    return " ".join(rng.choices(_WORDS, k=max(words, 0)))


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: the user's ``prompt`` after the earlier turns in
    ``history`` (``(role, content)`` pairs, oldest first), asking for ``max_tokens``."""

    prompt: str
    max_tokens: int
    chat: bool
    history: tuple[tuple[str, str], ...] = ()

    def messages(self) -> list[dict[str, str]]:
        """The chat messages: the history, then the prompt as the user's turn."""
        return [{"role": r, "content": c} for r, c in self.history] + \
            [{"role": "user", "content": self.prompt}]

    def text(self) -> str:
        """The plain-completion prompt: the history's contents, then the prompt."""
        return "\n\n".join([c for _, c in self.history] + [self.prompt])


@dataclass(frozen=True)
class Workload:
    """What to send: ``requests`` measured requests after ``warmup`` unmeasured ones.

    Prompts are ``prompt_tokens`` words (roughly as many tokens) drawn from a fixed list by
    a ``seed``-ed RNG, each led by its index so no two are alike. Every request asks for
    exactly ``max_tokens`` tokens (EOS ignored), through chat or plain completions; with a
    ``max_tokens_spread`` s > 0, each asks for a seeded draw from ``max_tokens`` x [1 - s,
    1 + s] instead (same mean), so that concurrent sequences do not all end on the same
    step. Warm-up requests ask for ``warmup_max_tokens`` tokens where that is set.
    """

    requests: int = 64
    prompt_tokens: int = 128
    max_tokens: int = 128
    chat: bool = True
    warmup: int = 2
    seed: int = 0
    warmup_max_tokens: int | None = None
    max_tokens_spread: float = 0.0

    def specs(self) -> tuple[list[RequestSpec], list[RequestSpec]]:
        """The warm-up requests and the measured ones (same workload: same prompts)."""
        rng = random.Random(self.seed)
        lengths = random.Random(self.seed + 1)
        low = max(1, round(self.max_tokens * (1 - self.max_tokens_spread)))
        high = max(low, round(self.max_tokens * (1 + self.max_tokens_spread)))
        specs = [RequestSpec(f"{i} " + random_text(rng, self.prompt_tokens - 1),
                             lengths.randint(low, high), self.chat)
                 for i in range(self.warmup + self.requests)]
        return shorten(specs[:self.warmup], self.warmup_max_tokens), specs[self.warmup:]


def shorten(specs: list[RequestSpec], max_tokens: int | None) -> list[RequestSpec]:
    """``specs`` asking for at most ``max_tokens`` tokens each (unchanged if None)."""
    if max_tokens is None:
        return specs
    return [replace(s, max_tokens=min(s.max_tokens, max_tokens)) for s in specs]


class WorkloadLike(Protocol):
    """What ``run_load`` and ``sweep`` need of a workload: seeded specs (a dataclass with a
    ``seed`` field, so ``sweep`` can give each level its own prompts)."""

    seed: int

    def specs(self) -> tuple[list[RequestSpec], list[RequestSpec]]: ...


@dataclass(frozen=True)
class Usage:
    """A response's token counts as the server reported them (its final usage)."""

    prompt_tokens: int | None
    completion_tokens: int


class Target(Protocol):
    """Something to load: ``stream`` yields the number of new tokens in each chunk as it
    arrives, optionally a final ``Usage`` (whose completion count then wins where it is
    larger: servers coalesce tokens into chunks), and raises on failure (``RequestError``
    where the target can name the kind)."""

    def stream(self, spec: RequestSpec) -> AsyncIterator[int | Usage]: ...


class RequestError(Exception):
    """A failed request; ``kind`` is the key it is counted under in ``LoadResult.errors``."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass(frozen=True)
class HttpTargetSpec:
    """How to open an ``HttpTarget``: picklable, so a client process can open its own."""

    base_url: str
    model: str
    api_key: str | None = None
    max_connections: int = 256
    timeout_s: float = 600.0
    extra_body: dict = field(default_factory=dict)

    def open(self) -> HttpTarget:
        """A new ``HttpTarget`` (its own client and connections) to this server."""
        return HttpTarget(self.base_url, self.model, self.api_key,
                          max_connections=self.max_connections, timeout_s=self.timeout_s,
                          extra_body=self.extra_body)


class HttpTarget:
    """An OpenAI-compatible server, streamed over one keep-alive ``httpx.AsyncClient``.

    Use it within one event loop and close it with ``aclose`` (or ``async with``).
    ``max_connections`` should be at least the highest concurrency it is run at. Every
    body asks for greedy decoding and ``ignore_eos``; ``extra_body`` is merged into it
    (e.g. a ``logit_bias`` against EOS for servers that ignore ``ignore_eos``). ``spec``
    says how to open another like it (``run_load`` does, in each client process).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 max_connections: int = 256, timeout_s: float = 600.0,
                 extra_body: dict | None = None):
        self.spec = HttpTargetSpec(base_url, model, api_key, max_connections, timeout_s,
                                   dict(extra_body or {}))
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            timeout=httpx.Timeout(timeout_s, connect=30.0))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> HttpTarget:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def stream(self, spec: RequestSpec) -> AsyncIterator[int | Usage]:
        """Yields 1 per content chunk, then the final ``Usage`` when the server sent one:
        only the total and the times of the first and last chunk are used, so how tokens
        spread over chunks does not matter."""
        body = {"model": self.spec.model, "max_tokens": spec.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
                **self.spec.extra_body}
        if spec.chat:
            path, body["messages"] = "/v1/chat/completions", spec.messages()
        else:
            path, body["prompt"] = "/v1/completions", spec.text()
        usage, done = None, False
        async with self._client.stream("POST", path, json=body) as response:
            if not response.is_success:
                await response.aread()
                raise RequestError(f"http_{response.status_code}", response.text[:200])
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                    code = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
                    raise RequestError(f"sse_error_{code or 'unknown'}", str(error)[:200])
                if event.get("usage"):
                    usage = Usage(event["usage"].get("prompt_tokens"),
                                  event["usage"]["completion_tokens"])
                if any((c.get("delta") or {}).get("content") or c.get("text")
                       for c in event.get("choices") or ()):
                    yield 1
        if not done:
            raise RequestError("incomplete_stream")
        if usage is not None:
            yield usage


def generation_request(spec: RequestSpec, model: str | None = None) -> GenerationRequest:
    """The engine request for ``spec``: greedy, exactly ``max_tokens`` tokens (EOS ignored)."""
    from mlx_serving.engine import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=spec.max_tokens, temperature=0, ignore_eos=True)
    if spec.chat:
        return GenerationRequest(model=model, params=params, messages=spec.messages())
    return GenerationRequest(model=model, params=params, prompt=spec.text())


class EngineTarget:
    """An engine driven through its ``generate``: an ``Engine`` in this process or an
    ``EngineProcess`` (the same engine in a child process)."""

    def __init__(self, engine: Engine | EngineProcess, model: str | None = None):
        self.engine = engine
        self.model = model

    async def stream(self, spec: RequestSpec) -> AsyncIterator[int]:
        async for delta in self.engine.generate(generation_request(spec, self.model)):
            if delta.error:
                raise RequestError(f"engine_{delta.error_code or 'error'}", delta.error)
            if delta.token_ids:
                yield len(delta.token_ids)


@dataclass
class _Record:
    """Timings (``time.perf_counter`` seconds; once a part of a level is over, seconds from
    its start) and token counts of one request."""

    start: float
    asked: int = 0  # max_tokens of the request
    first: float | None = None
    last: float | None = None
    end: float | None = None
    tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None
    error_detail: str = ""

    def since(self, origin: float) -> _Record:
        """This record with its times counted from ``origin``."""
        def shift(t: float | None) -> float | None:
            return None if t is None else t - origin
        return replace(self, start=self.start - origin, first=shift(self.first),
                       last=shift(self.last), end=shift(self.end))


Done = Callable[[_Record], None]  # told of each request as it ends


async def _measure(target: Target, spec: RequestSpec, done: Done | None = None) -> _Record:
    record = _Record(start=time.perf_counter(), asked=spec.max_tokens)
    try:
        async for n in target.stream(spec):
            if isinstance(n, Usage):
                record.prompt_tokens = n.prompt_tokens
                record.tokens = max(record.tokens, n.completion_tokens)
                continue
            record.last = time.perf_counter()
            if record.first is None:
                record.first = record.last
            record.tokens += n
        if not record.tokens:
            record.error = "no_tokens"
    except Exception as exc:  # a failed request is a data point, never the end of the run
        record.error = exc.kind if isinstance(exc, RequestError) else type(exc).__name__
        record.error_detail = str(exc)[:300]
    record.end = time.perf_counter()
    if done:
        done(record)
    return record


async def _closed_loop(target: Target, specs: list[RequestSpec], concurrency: int,
                       done: Done | None = None) -> list[_Record]:
    pending = iter(specs)  # shared by the workers; next() never awaits, so no lock is needed

    async def worker() -> list[_Record]:
        return [await _measure(target, spec, done) for spec in pending]

    per_worker = await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for records in per_worker for r in records]


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start) of ``n`` requests arriving as a Poisson process of
    ``rate`` requests/s (exponential gaps, seeded; the first at 0), as ``vllm bench serve``
    does with ``--request-rate``."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        times.append(t)
    return times


async def _open_loop(target: Target, timed: list[tuple[RequestSpec, float]],
                     max_concurrency: int, done: Done | None = None) -> list[_Record]:
    """Each request sent at its time (s from now), at most ``max_concurrency`` in flight
    (a request waiting for a slot is timed from its send, not from its arrival)."""
    slots = asyncio.Semaphore(max_concurrency)
    start = time.perf_counter()

    async def one(spec: RequestSpec, at: float) -> _Record:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        async with slots:
            return await _measure(target, spec, done)

    return list(await asyncio.gather(*(one(s, t) for s, t in timed)))


@dataclass(frozen=True)
class _Share:
    """The measured requests of a level, or one client process's part of them: closed loop
    at ``concurrency``, or, given ``times`` (each request's send time), open loop with at
    most ``concurrency`` in flight."""

    specs: list[RequestSpec]
    concurrency: int
    times: list[float] | None = None

    def split(self, n: int) -> list[_Share]:
        """``n`` shares (n <= concurrency): the concurrency's slots are dealt out in turn
        (share k gets concurrency // n, one more if k < concurrency % n), and request i
        goes to the share of slot i % concurrency, so each share's requests are in
        proportion to its slots (request i goes to share i % n where n divides the
        concurrency)."""
        owner = [i % self.concurrency % n for i in range(len(self.specs))]
        return [_Share([s for s, o in zip(self.specs, owner) if o == k],
                       self.concurrency // n + (k < self.concurrency % n),
                       None if self.times is None else
                       [t for t, o in zip(self.times, owner) if o == k]) for k in range(n)]

    async def drive(self, target: Target, done: Done | None = None) -> list[_Record]:
        """Send every request of the share to ``target``."""
        if self.times is None:
            return await _closed_loop(target, self.specs, self.concurrency, done)
        return await _open_loop(target, list(zip(self.specs, self.times)), self.concurrency,
                                done)


@dataclass
class _Part:
    """What one client drove: its records (times from its start), its wall time and the
    CPU time its process used meanwhile (``time.process_time``: user + system)."""

    records: list[_Record]
    wall_s: float
    cpu_s: float


async def _run_share(target: Target, share: _Share, done: Done | None = None) -> _Part:
    cpu, start = time.process_time(), time.perf_counter()
    records = await share.drive(target, done)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return _Part([r.since(start) for r in records], wall, cpu)


READY_TIMEOUT_S = 120.0  # for client processes to start (imports) and open their targets
_POLL_S = 0.01


def _client_process(spec: HttpTargetSpec, share: _Share, conn: Connection,
                    go: ProcessEvent) -> None:
    """A spawned client process: sends ("ready",) once its target is open, waits for
    ``go``, drives its share sending ("done", ok) as each request ends, then ("result",
    its ``_Part``); or ("error", the traceback), exiting with code 1."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops us
    try:
        conn.send(("result", asyncio.run(_client_main(spec, share, conn, go))))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        sys.exit(1)


async def _client_main(spec: HttpTargetSpec, share: _Share, conn: Connection,
                       go: ProcessEvent) -> _Part:
    async with spec.open() as target:
        conn.send(("ready",))
        parent = multiprocessing.parent_process()
        while not go.wait(1.0):  # blocks this loop, which has nothing else to run yet
            if parent is not None and not parent.is_alive():
                raise RuntimeError("the parent process is gone")
        return await _run_share(target, share, lambda r: conn.send(("done", r.error is None)))


class _ClientProcesses:
    """One spawned client process per share of a level, each with its own target opened
    from ``spec``; their messages come back over a pipe each, read by polling from the
    caller's event loop (so ``on_done`` runs there)."""

    def __init__(self, spec: HttpTargetSpec, shares: list[_Share]):
        self._spec, self._shares = spec, shares
        self._ctx = multiprocessing.get_context("spawn")  # fork is unsafe with threads (MLX)
        self._go = self._ctx.Event()
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._ready: set[int] = set()
        self._parts: dict[int, _Part] = {}
        self._on_done: Callable[[bool], None] | None = None

    def start(self) -> None:
        """Start every process."""
        for k, share in enumerate(self._shares):
            reader, writer = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(target=_client_process, name=f"loadgen-client-{k}",
                                     args=(self._spec, share, writer, self._go), daemon=True)
            try:
                proc.start()
            finally:
                writer.close()  # the child's end: once the child is gone, ours reads EOF
            self._procs.append(proc)
            self._conns.append(reader)

    async def wait_ready(self) -> None:
        """Until every process has its target open (``READY_TIMEOUT_S`` at most)."""
        await self._pump(lambda k: k in self._ready, time.monotonic() + READY_TIMEOUT_S)

    async def run(self, on_done: Callable[[bool], None] | None) -> list[_Part]:
        """Start the level in every process at once; their parts once all have ended."""
        self._on_done = on_done
        self._go.set()
        await self._pump(lambda k: k in self._parts)
        return [self._parts[k] for k in range(len(self._procs))]

    def close(self) -> None:
        """Stop the processes still running and join them all."""
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()

    async def _pump(self, finished: Callable[[int], bool], deadline: float | None = None
                    ) -> None:
        """Handle the processes' messages until each one is ``finished``; raises if one
        dies first, or if the ``deadline`` (``time.monotonic``) passes."""
        while True:
            for k, proc in enumerate(self._procs):
                gone = not proc.is_alive()  # before reading: all it ever sent is readable
                self._read(k)
                if gone and not finished(k):
                    raise self._failure(k)
            if all(finished(k) for k in range(len(self._procs))):
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"load client processes not ready in {READY_TIMEOUT_S:g} s")
            await asyncio.sleep(_POLL_S)

    def _read(self, k: int) -> None:
        conn = self._conns[k]
        try:
            while conn.poll():
                kind, *rest = conn.recv()
                if kind == "ready":
                    self._ready.add(k)
                elif kind == "done":
                    if self._on_done:
                        self._on_done(rest[0])
                elif kind == "result":
                    self._parts[k] = rest[0]
                else:
                    raise self._failure(k, rest[0])
        except EOFError:
            pass  # the process has exited; _pump sees it gone

    def _failure(self, k: int, detail: str = "") -> RuntimeError:
        proc = self._procs[k]
        proc.join(10)
        return RuntimeError(f"load client process {k} (of {len(self._procs)}) failed, exit "
                            f"code {proc.exitcode}" + (f":\n{detail}" if detail else ""))


@asynccontextmanager
async def _client_processes(spec: HttpTargetSpec, shares: list[_Share]
                            ) -> AsyncIterator[_ClientProcesses]:
    """Started client processes, ready to run; stopped and joined on the way out, however
    it is left (a failure, a cancellation, Ctrl-C)."""
    clients = _ClientProcesses(spec, shares)
    try:
        clients.start()
        await clients.wait_ready()
        yield clients
    finally:
        clients.close()


def _stats_ms(seconds: list[float], keys: tuple[str, ...]) -> dict[str, float | None]:
    """Percentiles (numpy's default linear interpolation) and mean, in ms; None if empty."""
    if not seconds:
        return dict.fromkeys(keys)
    ms = np.asarray(seconds) * 1e3
    return {k: round(float(ms.mean() if k == "mean" else np.percentile(ms, float(k[1:]))), 3)
            for k in keys}


@dataclass
class LoadResult:
    """One load level. Tokens, latencies and rates count successful requests only.

    TTFT runs from sending a request to its first content chunk; a request's inter-token
    latency is (last chunk - first chunk) / (tokens - 1), so the ``itl_ms`` percentiles are
    over per-request means (chunks may carry several tokens, hiding the gaps within them;
    ``vllm bench serve`` calls this TPOT). ``rate`` is the offered request rate of an
    open-loop level (None: closed loop). ``error_examples`` keeps the first message of each
    error kind. ``requests_short`` counts successful responses
    with fewer tokens than asked (an EOS the server did not ignore): a fair comparison
    has none. ``input_tokens`` totals the prompt tokens servers reported (None if none did).
    ``client_processes`` is how many processes sent the requests and ``client_cpu`` the
    busiest one's CPU time over its wall time (1.0: a core saturated, so the numbers may
    be the client's limit, not the server's; None: not measured). ``host_busy_cpus`` is the
    mean number of the machine's CPUs busy during the level, all processes counted, and
    ``host_steal`` the share of its CPU time a hypervisor gave to other guests (None where
    the OS does not tell: macOS).

    ``steady_tok_s`` is the output tokens/s of a closed-loop level before its drain: from
    its start until the first client ran out of requests to send (``steady_s`` seconds),
    after which fewer requests are in flight than the level holds and the last ones finish
    on their own. A request's tokens count as spread evenly between its first and last
    chunk. On several replicas the drain lasts longer than on one (each replica's last
    requests end at a different time), so it separates the replicas' rate from the end of
    a level of fixed size (None: an open-loop level, or no request sent).
    """

    concurrency: int
    requests_ok: int
    requests_failed: int
    errors: dict[str, int]
    duration_s: float
    output_tokens: int
    output_tok_s: float
    requests_s: float
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    counters: dict[str, float] | None = None  # the probe's change over the measured part
    rate: float | None = None
    requests_short: int = 0
    input_tokens: int | None = None
    error_examples: dict[str, str] = field(default_factory=dict)  # the first of each kind
    client_processes: int = 1
    client_cpu: float | None = None
    host_busy_cpus: float | None = None
    host_steal: float | None = None
    steady_tok_s: float | None = None
    steady_s: float | None = None

    @classmethod
    def from_records(cls, concurrency: int, records: list[_Record], duration_s: float,
                     rate: float | None = None, *, client_processes: int = 1,
                     client_cpu: float | None = None,
                     host_cpu: tuple[float, float] | None = None,
                     steady_until: float | None = None) -> LoadResult:
        """The result of ``records``; ``host_cpu`` is (busy CPUs, stolen share), if known;
        ``steady_until`` is when the drain began (seconds from the level's start)."""
        ok = [r for r in records if r.error is None]
        tokens = sum(r.tokens for r in ok)
        steady = steady_until is not None and steady_until > 0
        prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        return cls(
            concurrency=concurrency, requests_ok=len(ok), requests_failed=len(records) - len(ok),
            errors=dict(Counter(r.error for r in records if r.error is not None)),
            duration_s=round(duration_s, 4), output_tokens=tokens,
            output_tok_s=round(tokens / duration_s, 2), requests_s=round(len(ok) / duration_s, 3),
            ttft_ms=_stats_ms([r.first - r.start for r in ok], ("p50", "p90", "p99", "mean")),
            itl_ms=_stats_ms([(r.last - r.first) / (r.tokens - 1) for r in ok if r.tokens > 1],
                             ("p50", "p99", "mean")),
            e2e_ms=_stats_ms([r.end - r.start for r in ok], ("p50", "p90", "p99")),
            rate=rate, requests_short=sum(r.tokens < r.asked for r in ok),
            input_tokens=sum(prompts) if prompts else None,
            error_examples={r.error: r.error_detail for r in reversed(records) if r.error},
            client_processes=client_processes,
            client_cpu=None if client_cpu is None else round(client_cpu, 3),
            host_busy_cpus=None if host_cpu is None else round(host_cpu[0], 2),
            host_steal=None if host_cpu is None else round(host_cpu[1], 4),
            steady_tok_s=round(_tokens_until(ok, steady_until) / steady_until, 2)
            if steady else None,
            steady_s=round(steady_until, 4) if steady else None)

    def to_dict(self) -> dict:
        return asdict(self)


def _tokens_until(records: list[_Record], until: float) -> float:
    """The output tokens of ``records`` that arrived by ``until``, each request's tokens
    spread evenly between its first and its last chunk."""
    total = 0.0
    for r in records:
        if r.first is None or r.first > until:
            continue
        if r.last is None or r.last <= until or r.tokens < 2:
            total += r.tokens
        else:
            total += 1 + (r.tokens - 1) * (until - r.first) / (r.last - r.first)
    return total


Probe = Callable[[], Awaitable[dict[str, float]]]


async def run_load(target: Target, workload: WorkloadLike, concurrency: int,
                   probe: Probe | None = None, *, rate: float | None = None,
                   on_done: Callable[[bool], None] | None = None,
                   processes: int = 1) -> LoadResult:
    """Run the workload closed-loop: ``concurrency`` workers each send their next request
    as soon as their last one ends; or, with ``rate``, open-loop: requests arrive as a
    Poisson process of ``rate`` per second (seeded by the workload), at most
    ``concurrency`` in flight. Warm-up requests go first, closed-loop at ``concurrency``,
    and are left out of the result.

    One Python client saturates a core at roughly 15k streamed chunks/s (the result's
    ``client_cpu`` shows it); ``processes`` > 1 spreads the measured requests over that
    many spawned client processes (at most one per request in flight), each with its own
    ``HttpTarget`` opened from ``target.spec`` (so ``target`` must be one). Each gets an
    even share of the concurrency and of the requests (request i goes to process i % n
    where n divides the concurrency) and runs them closed-loop, or open-loop at their
    arrival times with its share as its cap. The warm-up stays in this process; the
    processes start after it, and the level (and the probe's window) once all are ready.

    ``probe`` reads counters of the system under load (engine steps, tokens, ...); it is
    read before and after the measured requests and the result keeps the differences.
    ``on_done`` is called as each measured request ends, with whether it succeeded
    (a progress bar), in this process and its event loop whatever ``processes`` is.
    """
    if processes > 1 and not isinstance(target, HttpTarget):
        raise ValueError(f"processes={processes} needs an HttpTarget (each client process "
                         f"opens its own from its spec), not a {type(target).__name__}")
    warmup, measured = workload.specs()
    await _closed_loop(target, warmup, concurrency)
    times = None if rate is None else arrival_times(len(measured), rate, workload.seed)
    share = _Share(measured, concurrency, times)
    n = max(1, min(processes, concurrency, len(measured)))

    async def window_start() -> tuple[dict[str, float] | None, HostCpuTimes | None]:
        """The probe's counters and the host's CPU times as the measured requests start."""
        return (await probe() if probe else None), HostCpuTimes.read()

    if n == 1:
        before, host_before = await window_start()
        parts = [await _run_share(target, share,
                                  (lambda r: on_done(r.error is None)) if on_done else None)]
    else:
        async with _client_processes(target.spec, share.split(n)) as clients:
            before, host_before = await window_start()
            parts = await clients.run(on_done)
    host_after = HostCpuTimes.read()
    # the drain begins as the first client sends its last request (closed loop only)
    sent_last = [max(r.start for r in p.records) for p in parts if p.records]
    result = LoadResult.from_records(
        concurrency, [r for p in parts for r in p.records], max(p.wall_s for p in parts), rate,
        client_processes=n, client_cpu=max(p.cpu_s / p.wall_s for p in parts),
        host_cpu=host_after.since(host_before) if host_before and host_after else None,
        steady_until=min(sent_last) if rate is None and sent_last else None)
    if probe:
        after = await probe()
        result.counters = {k: after[k] - before.get(k, 0) for k in after}
    return result


async def sweep(target: Target, workload: WorkloadLike, concurrencies: list[int]) -> list[LoadResult]:
    """``run_load`` at each concurrency in turn. Level i uses seed ``workload.seed + i``, so
    a prefix cache never serves one level's prompts from an earlier level."""
    return [await run_load(target, replace(workload, seed=workload.seed + i), c)
            for i, c in enumerate(concurrencies)]


def format_table(results: list[LoadResult]) -> str:
    """A markdown table of results, one row per load level."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f}"

    lines = ["| concurrency | ok | failed | short | output tok/s | req/s | TTFT p50 / p90 / p99 ms "
             "| ITL p50 / p99 ms | E2E p50 / p99 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t, i, e = r.ttft_ms, r.itl_ms, r.e2e_ms
        level = f"{r.concurrency}" if r.rate is None else f"{r.concurrency} @ {r.rate:g} req/s"
        lines.append(f"| {level} | {r.requests_ok} | {r.requests_failed} | {r.requests_short} "
                     f"| {r.output_tok_s:,.1f} | {r.requests_s:,.2f} "
                     f"| {ms(t['p50'])} / {ms(t['p90'])} / {ms(t['p99'])} "
                     f"| {ms(i['p50'])} / {ms(i['p99'])} | {ms(e['p50'])} / {ms(e['p99'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Sweep an HTTP endpoint; exits 1 when some level had no successful request."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="measured requests per level")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each level")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--completions", action="store_true", help="/v1/completions, not chat")
    p.add_argument("--json", help="write the workload and results here")
    args = p.parse_args(argv)
    workload = Workload(requests=args.requests, prompt_tokens=args.prompt_tokens,
                        max_tokens=args.max_tokens, chat=not args.completions,
                        warmup=args.warmup, seed=args.seed)

    async def run() -> list[LoadResult]:
        async with HttpTarget(args.url, args.model, args.api_key,
                              max_connections=max(args.concurrency)) as target:
            return await sweep(target, workload, args.concurrency)

    results = asyncio.run(run())
    print(f"{args.url} model {args.model}: {workload}\n\n{format_table(results)}")
    for r in results:
        if r.errors:
            print(f"concurrency {r.concurrency} errors: {r.errors}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"url": args.url, "model": args.model, "workload": asdict(workload),
                       "results": [r.to_dict() for r in results]}, f, indent=2)
    return 1 if any(r.requests_ok == 0 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
