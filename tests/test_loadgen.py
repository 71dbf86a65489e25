"""The load generator against a real streaming HTTP server on loopback and a real engine."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import pickle
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from mlx_serving.bench.loadgen import (EngineTarget, HttpTarget, HttpTargetSpec, LoadResult,
                                       Workload, _Record, arrival_times, format_table, main,
                                       run_load, sweep)
from mlx_serving.engine import Engine, EngineConfig, EngineProcess, ModelConfig

CHUNKS, TOKENS_PER_CHUNK = 4, 3           # each response: 12 tokens, coalesced 3 to a chunk
FIRST_DELAY_S, CHUNK_DELAY_S = 0.05, 0.02  # before the first content chunk, between chunks
TOKENS = CHUNKS * TOKENS_PER_CHUNK


@dataclass
class FakeServer:
    """An OpenAI-shaped SSE server; requests are numbered in arrival order from 0."""

    url: str = ""
    fail_500: set[int] = field(default_factory=set)       # these answer HTTP 500
    error_event: set[int] = field(default_factory=set)    # these stream an error mid-way
    bodies: list[dict] = field(default_factory=list)

    def reset(self, fail_500=(), error_event=()) -> None:
        self.fail_500, self.error_event, self.bodies = set(fail_500), set(error_event), []

    async def handle(self, request: Request):
        body = await request.json()
        n = len(self.bodies)
        self.bodies.append(body)
        if n in self.fail_500:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        chat = request.url.path.endswith("/chat/completions")

        def chunk(choice: dict | None, usage: dict | None = None) -> str:
            event = {"id": f"r{n}", "object": "chat.completion.chunk" if chat else "text_completion",
                     "model": body["model"], "choices": [choice] if choice else [], "usage": usage}
            return f"data: {json.dumps(event)}\n\n"

        def content(text: str, finish: str | None = None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def events():
            if chat:  # a role-only chunk first: carries no token
                yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None})
            await asyncio.sleep(FIRST_DELAY_S)
            for i in range(CHUNKS):
                if i:
                    await asyncio.sleep(CHUNK_DELAY_S)
                if i == 2 and n in self.error_event:
                    yield 'data: {"error": {"message": "engine died", "code": "engine_error"}}\n\n'
                    yield "data: [DONE]\n\n"
                    return
                yield chunk(content(" tok" * TOKENS_PER_CHUNK))
            yield chunk(content("", finish="length"))
            yield chunk(None, usage={"prompt_tokens": 20, "completion_tokens": TOKENS,
                                     "total_tokens": 20 + TOKENS})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def fake_server():
    fake = FakeServer()
    app = Starlette(routes=[Route("/v1/chat/completions", fake.handle, methods=["POST"]),
                            Route("/v1/completions", fake.handle, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    yield fake
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    fake_server.reset()
    return fake_server


def http_run(url: str, workload: Workload, concurrency: int, **kwargs):
    async def go():
        async with HttpTarget(url, "fake", max_connections=concurrency) as target:
            return await run_load(target, workload, concurrency, **kwargs)
    return asyncio.run(go())


def prompt(body: dict) -> str:
    return body.get("prompt") or body["messages"][-1]["content"]


def client_processes_left() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("loadgen-client")]


@pytest.mark.parametrize("chat", [True, False])
def test_http_counts_tokens_and_times(server, chat):
    workload = Workload(requests=6, warmup=2, prompt_tokens=16, max_tokens=TOKENS, chat=chat)
    result = http_run(server.url, workload, concurrency=3)

    assert (result.requests_ok, result.requests_failed, result.errors) == (6, 0, {})
    assert result.output_tokens == 6 * TOKENS  # the usage total, not the 4 chunks per request
    assert result.output_tok_s == pytest.approx(result.output_tokens / result.duration_s, rel=0.01)
    # Warm-up requests reached the server but not the result; every prompt differs.
    assert len(server.bodies) == 8
    assert len({b.get("prompt") or b["messages"][0]["content"] for b in server.bodies}) == 8
    body = server.bodies[0]
    assert body["stream"] and body["ignore_eos"] and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == TOKENS and ("messages" in body) == chat
    # TTFT waits for content, not the role chunk; ITL spreads 3 chunk gaps over 11 tokens.
    assert FIRST_DELAY_S * 1e3 * 0.9 < result.ttft_ms["p50"] < 1000
    itl = CHUNK_DELAY_S * 1e3 * (CHUNKS - 1) / (TOKENS - 1)
    assert itl * 0.5 < result.itl_ms["mean"] < itl * 10
    assert result.e2e_ms["p50"] >= (FIRST_DELAY_S + 3 * CHUNK_DELAY_S) * 1e3 * 0.9
    assert set(result.ttft_ms) == {"p50", "p90", "p99", "mean"}
    assert result.client_processes == 1 and 0 < result.client_cpu <= 2


def test_http_errors_are_counted_not_raised(server):
    server.reset(fail_500={0, 3}, error_event={5})  # request 0 is the warm-up
    result = http_run(server.url, Workload(requests=6, warmup=1, prompt_tokens=8), concurrency=2)

    assert result.errors == {"http_500": 1, "sse_error_engine_error": 1}
    assert (result.requests_ok, result.requests_failed) == (4, 2)
    # What the server said comes with each kind, so a failed run can be diagnosed.
    assert set(result.error_examples) == set(result.errors)
    assert result.error_examples["http_500"].startswith("http_500: ")
    assert result.output_tokens == 4 * TOKENS


def test_http_unreachable_server_is_counted():
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = http_run(url, Workload(requests=3, warmup=0), concurrency=2)

    assert result.errors == {"ConnectError": 3}
    assert result.requests_ok == 0 and result.ttft_ms["p50"] is None


def test_two_client_processes_send_what_one_does(server):
    """The same requests, tokens and progress calls from two processes as from one; each
    process times its own requests, so TTFT is still from send to first chunk."""
    workload = Workload(requests=12, warmup=2, prompt_tokens=8, max_tokens=TOKENS)
    one = http_run(server.url, workload, concurrency=3)
    sent_by_one = sorted(prompt(b) for b in server.bodies)
    server.reset()
    ended = []
    two = http_run(server.url, workload, concurrency=3, processes=2, on_done=ended.append)

    assert (two.requests_ok, two.requests_failed, two.output_tokens, two.input_tokens) == \
        (one.requests_ok, one.requests_failed, one.output_tokens, one.input_tokens) == \
        (12, 0, 12 * TOKENS, 12 * 20)
    assert sorted(prompt(b) for b in server.bodies) == sent_by_one  # warm-up included
    assert ended == [True] * 12
    assert (one.client_processes, two.client_processes) == (1, 2)
    assert isinstance(two.client_cpu, float) and 0 < two.client_cpu <= 4
    assert FIRST_DELAY_S * 1e3 * 0.9 < two.ttft_ms["p50"] < 1000
    # 3 streams split 2 + 1, the requests 8 + 4: both processes take as long as one did
    assert two.duration_s < 1.5 * one.duration_s + 0.1
    # the drain starts when a process has sent its last request: before the level's end
    for result in (one, two):
        assert 0 < result.steady_s < result.duration_s and result.steady_tok_s > 0, result
    assert not client_processes_left()


def test_open_loop_over_client_processes_keeps_the_arrival_times(server):
    workload = Workload(requests=8, warmup=0, prompt_tokens=8, max_tokens=TOKENS, seed=5)
    result = http_run(server.url, workload, concurrency=2, processes=5, rate=40.0)

    assert (result.requests_ok, result.rate, result.output_tokens) == (8, 40.0, 8 * TOKENS)
    assert result.client_processes == 2  # at most one process per request in flight
    assert result.steady_tok_s is None  # an open loop has no drain to leave out
    assert len(server.bodies) == 8
    # the last request was not sent before its arrival time, and took a response's time
    assert result.duration_s >= arrival_times(8, 40.0, seed=5)[-1] + FIRST_DELAY_S
    assert not client_processes_left()


def test_a_client_process_that_dies_fails_the_level(server):
    killed = []

    def kill_one(ok: bool) -> None:
        if not killed:
            victim = client_processes_left()[0]
            victim.kill()
            killed.append(victim.name)

    with pytest.raises(RuntimeError, match=r"load client process \d \(of 2\) failed, "
                                           r"exit code -9"):
        http_run(server.url, Workload(requests=40, warmup=0, prompt_tokens=8), concurrency=2,
                 processes=2, on_done=kill_one)
    assert killed and not client_processes_left()  # the other one was stopped too


# A client process unpickles its target and share from the load generator's module: that must
# not import mlx-lm (1.6 s here, ~15 s of CPU on a GPU host whose Python has torch, paid by
# every client process at every level) or the engine. The share is unpickled before
# multiprocessing sets the child's parent_process(), as loadgen's own classes are here.
SPAWNED_CLIENT = """
import multiprocessing, sys
def imported(queue, spec):
    queue.put(sorted(m for m in ("mlx", "mlx_lm", "mlx_serving.engine") if m in sys.modules))
if __name__ == "__main__":
    from mlx_serving.bench.loadgen import HttpTargetSpec
    from mlx_serving.engine import Engine  # noqa: F401  a parent may drive an engine
    assert "mlx_lm" in sys.modules  # imported under engine.fd_limits' guard
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=imported, args=(queue, HttpTargetSpec("http://x", "m")))
    child.start()
    print(queue.get(timeout=120))
    child.join()
"""


def test_a_client_process_imports_neither_mlx_nor_the_engine(tmp_path):
    script = tmp_path / "spawned.py"
    script.write_text(SPAWNED_CLIENT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


class LocalTarget:
    """A target in this process (not HTTP): streams one token."""

    async def stream(self, spec):
        yield 1


def test_client_processes_need_an_http_target():
    with pytest.raises(ValueError, match="processes=2 needs an HttpTarget"):
        asyncio.run(run_load(LocalTarget(), Workload(requests=2, warmup=0), 2, processes=2))
    single = asyncio.run(run_load(LocalTarget(), Workload(requests=2, warmup=0), 2))
    assert single.requests_ok == 2 and single.client_processes == 1


def test_http_target_spec_opens_a_like_target():
    async def go():
        async with HttpTarget("http://h:1/", "m", "key", max_connections=7, timeout_s=3.0,
                              extra_body={"logit_bias": {"2": -100}}) as target:
            spec = pickle.loads(pickle.dumps(target.spec))
            async with spec.open() as again:
                return spec, again.spec

    spec, again = asyncio.run(go())
    assert spec == again == HttpTargetSpec("http://h:1/", "m", "key", 7, 3.0,
                                           {"logit_bias": {"2": -100}})


def test_cli_sweeps_and_writes_json(server, tmp_path, capsys):
    out = tmp_path / "out.json"
    code = main(["--url", server.url, "--model", "fake", "--concurrency", "1", "2",
                 "--requests", "3", "--warmup", "1", "--max-tokens", str(TOKENS),
                 "--completions", "--json", str(out)])

    assert code == 0
    table = capsys.readouterr().out
    assert "| concurrency |" in table and "\n| 1 | 3 | 0 |" in table and "\n| 2 | 3 | 0 |" in table
    saved = json.loads(out.read_text())
    assert [r["concurrency"] for r in saved["results"]] == [1, 2]
    assert all(r["output_tokens"] == 3 * TOKENS for r in saved["results"])
    assert saved["workload"]["chat"] is False
    # Each level has its own prompts, so no level is served from another's prefix cache.
    assert len({b["prompt"] for b in server.bodies}) == 8


@pytest.fixture(scope="module", params=[Engine, EngineProcess])
def engine(request, tiny_model_path):
    engine = request.param(EngineConfig(models=[ModelConfig(name="tiny", path=str(tiny_model_path))]))
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("chat", [True, False])
def test_engine_target_generates_every_token(engine, chat):
    workload = Workload(requests=6, warmup=2, prompt_tokens=24, max_tokens=16, chat=chat)
    result = asyncio.run(run_load(EngineTarget(engine, "tiny"), workload, concurrency=3))

    assert (result.requests_ok, result.requests_failed) == (6, 0)
    assert result.output_tokens == 6 * 16  # EOS ignored: every request runs to max_tokens
    assert result.ttft_ms["p50"] > 0 and result.itl_ms["mean"] > 0


def test_engine_target_errors_and_sweep(engine):
    workload = Workload(requests=2, warmup=0, prompt_tokens=8, max_tokens=4)
    missing = asyncio.run(run_load(EngineTarget(engine, "missing"), workload, concurrency=2))
    assert missing.errors == {"ModelNotFoundError": 2} and missing.requests_ok == 0

    results = asyncio.run(sweep(EngineTarget(engine), workload, [1, 2]))
    assert [(r.concurrency, r.requests_ok, r.output_tokens) for r in results] == [(1, 2, 8), (2, 2, 8)]
    assert format_table(results).count("\n") == 3
    json.dumps([r.to_dict() for r in results])


def test_probe_counts_only_the_measured_requests(engine):
    """The probe is read around the measured part: the engine's counters over it match the
    load (every measured token, no warm-up token), and prefill work is accounted for."""
    fields = ("steps", "prefill_steps", "prefill_s", "decode_s", "generated_tokens", "join_s",
              "admit_s", "release_s", "tokens_s", "idle_s")

    async def probe():
        stats = engine.stats()
        return {k: getattr(stats, k) for k in fields}

    workload = Workload(requests=4, warmup=2, prompt_tokens=16, max_tokens=8)
    result = asyncio.run(run_load(EngineTarget(engine, "tiny"), workload, concurrency=2, probe=probe))

    c = result.counters
    assert c["generated_tokens"] == result.output_tokens == 4 * 8
    assert 0 < c["prefill_steps"] <= c["steps"] and c["prefill_s"] > 0 and c["decode_s"] > 0
    # every request went into the batch, handed tokens over and left it
    assert c["admit_s"] > 0 and c["tokens_s"] > 0 and c["release_s"] > 0 and c["idle_s"] >= 0
    assert c["join_s"] > 0   # the prefilled sequences moved into the decode batch
    busy = (c["prefill_s"] + c["decode_s"] + c["join_s"] + c["admit_s"] + c["release_s"]
            + c["tokens_s"])
    assert busy <= result.duration_s * 1.05 + 0.05
    assert result.to_dict()["counters"] == c


def test_compare_drives_every_path_at_every_level_and_reports_against_the_first(engine):
    from dataclasses import asdict

    from mlx_serving.bench.compare import drive, engine_counters, report

    async def probe():
        return engine_counters(asdict(engine.stats()))

    target = (EngineTarget(engine, "tiny"), probe)
    levels = [(1, Workload(requests=2, warmup=0, prompt_tokens=8, max_tokens=4)),
              (2, Workload(requests=2, warmup=0, prompt_tokens=8, max_tokens=4))]
    runs = asyncio.run(drive({"a": target, "b": target}, levels, repeats=2))

    assert {n: {p: len(rs) for p, rs in by_path.items()} for n, by_path in runs.items()} == \
        {1: {"a": 2, "b": 2}, 2: {"a": 2, "b": 2}}
    assert all(r.counters["generated_tokens"] == 8 for by_path in runs.values()
               for rs in by_path.values() for r in rs)
    table = report(runs, {"a": "first", "b": "second"}).splitlines()
    assert len(table) == 2 + 4 and "÷ first" in table[0]
    first = [line.split(" | ") for line in table[2:] if " first " in line]
    assert all(cells[3] == "1.000" and cells[4] == "1.000 (1.000–1.000)" for cells in first)
    shares = [cells[10].strip(" |").split(" / ") for cells in first]
    assert all(len(s) == 6 and all(x.isdigit() for x in s) for s in shares)
    assert "failed" not in "\n".join(table)

    # A run with failed requests is marked: it did less work than its neighbours.
    runs[1]["b"][0].requests_failed = 1
    assert "; 1 failed |" in report(runs, {"a": "first", "b": "second"})


def test_max_tokens_spread_varies_lengths_not_prompts():
    fixed = Workload(requests=200, warmup=0, max_tokens=100, seed=3)
    spread = Workload(requests=200, warmup=0, max_tokens=100, seed=3, max_tokens_spread=0.5)
    _, a = fixed.specs()
    _, b = spread.specs()
    assert [s.text() for s in a] == [s.text() for s in b]  # the same prompts on both
    lengths = [s.max_tokens for s in b]
    assert all(50 <= n <= 150 for n in lengths)
    assert len(set(lengths)) > 20 and 90 <= sum(lengths) / len(lengths) <= 110
    assert lengths == [s.max_tokens for s in spread.specs()[1]]  # seeded: every path alike
    assert {s.max_tokens for s in a} == {100}


def test_steady_throughput_leaves_out_the_drain():
    """Tokens before the drain count as spread evenly between a request's first and last
    chunk; a request whose first token comes later counts none."""
    records = [_Record(start=0.0, first=1.0, last=3.0, end=3.0, tokens=5, asked=5),
               _Record(start=0.5, first=1.5, last=1.5, end=1.5, tokens=1, asked=1),
               _Record(start=2.0, first=2.5, last=6.5, end=6.5, tokens=9, asked=9),
               _Record(start=0.2, end=0.4, error="http_500")]
    result = LoadResult.from_records(2, records, duration_s=6.5, steady_until=2.0)

    assert result.output_tokens == 15 and result.output_tok_s == pytest.approx(15 / 6.5, rel=0.01)
    assert (result.steady_s, result.steady_tok_s) == (2.0, pytest.approx((1 + 4 / 2 + 1) / 2))
    assert LoadResult.from_records(2, records, duration_s=6.5).steady_tok_s is None
