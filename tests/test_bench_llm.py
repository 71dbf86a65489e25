"""``mlx-serving bench llm`` and its parts: workloads, open-loop load, reports, and a real
``mlx_lm.server`` on the tiny model driven end to end (no Ray)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import statistics
import sys
from pathlib import Path

import pytest

from mlx_serving.bench import llm
from mlx_serving.bench.crosscheck import load_result, scenario
from mlx_serving.bench.llm import (client_bound_warning, client_lines, client_use,
                                   replica_shares, server_options)
from mlx_serving.bench.llm import main as bench_main
from mlx_serving.bench.loadgen import (LoadResult, RequestSpec, Usage, Workload, arrival_times,
                                       run_load)
from mlx_serving.bench.report import median_run, ratio_table
from mlx_serving.bench.servers import (ServerOptions, eos_logit_bias, mlx_lm_command, our_config,
                                       start_mlx_lm)
from mlx_serving.bench.workloads import (SHAREGPT_INPUT_MEAN, SHAREGPT_OUTPUT_MEAN,
                                         SharedPrefixChat, ShareGPTLike)
from mlx_serving.deployments.cli import build_parser
from mlx_serving.deployments.qos import Action, Slo
from mlx_serving.deployments.settings import AppConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sharegpt_lengths_follow_the_published_means_and_bounds():
    warmup, measured = ShareGPTLike(requests=4000, warmup=3, seed=7, warmup_max_tokens=8).specs()
    again = ShareGPTLike(requests=4000, warmup=3, seed=7, warmup_max_tokens=8).specs()[1]
    assert measured == again and ShareGPTLike(requests=4000, seed=8).specs()[1] != measured

    ins = [len(s.prompt.split()) for s in measured]
    outs = [s.max_tokens for s in measured]
    assert min(ins) >= 4 and max(ins) <= 1024 and min(outs) >= 4 and max(outs) <= 1024
    # Clipping at 1024 trims the tail a little: the means stay within 10% of ShareGPT's.
    assert statistics.mean(ins) == pytest.approx(SHAREGPT_INPUT_MEAN, rel=0.1)
    assert statistics.mean(outs) == pytest.approx(SHAREGPT_OUTPUT_MEAN, rel=0.1)
    assert statistics.median(outs) < statistics.mean(outs)  # right-skewed, as ShareGPT is
    assert len(warmup) == 3 and all(s.max_tokens <= 8 for s in warmup)

    scaled = ShareGPTLike(requests=4000, seed=7, scale=0.25).specs()[1]
    assert statistics.mean(s.max_tokens for s in scaled) == pytest.approx(SHAREGPT_OUTPUT_MEAN / 4,
                                                                         rel=0.1)


def test_shared_prefix_turns_extend_the_same_conversation():
    workload = SharedPrefixChat(requests=10, warmup=2, system_tokens=20, turn_tokens=5,
                                max_tokens=6, turns=3)
    warmup, measured = workload.specs()
    specs = warmup + measured
    assert len(specs) == 12 and len(measured) == 10
    system = specs[0].history[0]
    assert system[0] == "system" and len(system[1].split()) == 20
    assert all(s.history[0] == system for s in specs)  # one prefix shared by every request

    by_turn = {}  # conversation id -> its specs in turn order
    for s in specs:
        by_turn.setdefault(s.prompt.split()[0].split(".")[0], []).append(s)
    for turns in by_turn.values():
        for t, s in enumerate(turns):
            assert len(s.history) == 1 + 2 * t
            if t:
                before = turns[t - 1]
                assert s.history[:len(before.history)] == before.history
                assert s.history[len(before.history)] == ("user", before.prompt)
                assert s.history[-1][0] == "assistant" and len(s.history[-1][1].split()) == 6
    messages = specs[-1].messages()
    assert messages[0]["role"] == "system" and messages[-1] == {"role": "user",
                                                                 "content": specs[-1].prompt}
    assert specs[-1].text().endswith(specs[-1].prompt) and system[1] in specs[-1].text()


class CountingTarget:
    """A target that streams ``max_tokens`` single-token chunks, then a Usage, and records
    the most requests it ever had in flight; ``gate`` holds every request until set."""

    def __init__(self):
        self.in_flight = self.most = self.served = 0
        self.gate = asyncio.Event()

    async def stream(self, spec: RequestSpec):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.gate.wait()
            for _ in range(spec.max_tokens):
                await asyncio.sleep(0)
                yield 1
            yield Usage(prompt_tokens=len(spec.prompt.split()), completion_tokens=spec.max_tokens)
        finally:
            self.in_flight -= 1
            self.served += 1


def test_open_loop_sends_every_request_and_caps_requests_in_flight():
    target = CountingTarget()
    workload = Workload(requests=12, warmup=0, prompt_tokens=8, max_tokens=5)
    ended = []

    async def go():
        load = asyncio.create_task(run_load(target, workload, concurrency=3, rate=1e6,
                                            on_done=ended.append))
        while target.in_flight < 3 and not load.done():  # every slot taken, the gate shut
            await asyncio.sleep(0)
        for _ in range(100):  # the other arrivals queue up behind the cap meanwhile
            await asyncio.sleep(0)
        target.gate.set()
        return await load

    result = asyncio.run(go())
    assert target.most == 3  # the cap, never more
    assert (result.requests_ok, result.requests_failed, result.rate) == (12, 0, 1e6)
    assert result.output_tokens == 12 * 5 and result.requests_short == 0
    assert result.input_tokens == 12 * 8
    assert ended == [True] * 12


def test_poisson_arrivals_are_seeded_with_the_asked_mean_gap():
    times = arrival_times(5000, rate=4.0, seed=3)
    assert times == arrival_times(5000, rate=4.0, seed=3) and times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert times[-1] / (len(times) - 1) == pytest.approx(0.25, rel=0.05)


def result(concurrency: int, tok_s: float, **kw) -> LoadResult:
    ms = {"p50": 10.0, "p90": 20.0, "p99": 30.0, "mean": 12.0}
    return LoadResult(concurrency=concurrency, requests_ok=4, requests_failed=0, errors={},
                      duration_s=1.0, output_tokens=int(tok_s), output_tok_s=tok_s, requests_s=4.0,
                      ttft_ms=ms, itl_ms={"p50": 1.0, "p99": 2.0, "mean": 1.1},
                      e2e_ms={"p50": 100.0, "p90": 150.0, "p99": 200.0}, **kw)


def test_ratio_table_divides_median_runs_by_the_baseline():
    assert median_run([result(1, 30.0), result(1, 10.0), result(1, 20.0)]).output_tok_s == 20.0
    runs = {"base": [[result(1, 10.0)], [result(8, 40.0)]],
            "ours": [[result(1, 15.0), result(1, 25.0), result(1, 20.0)], [result(8, 20.0)]]}
    lines = ratio_table(runs, "base").splitlines()
    assert "÷ base" in lines[0] and len(lines) == 2 + 4
    ours_1 = next(line for line in lines if line.startswith("| 1 | ours"))
    assert "| 20.0 (15.0–25.0) | 2.00 |" in ours_1
    assert "| 0.50 |" in next(line for line in lines if line.startswith("| 8 | ours"))


def test_report_gives_each_replicas_share_of_the_tokens_and_its_step_rate():
    t, st = "mlx_serving:engine_generation_tokens_total", "mlx_serving:engine_steps_total"
    runs = {"mlx-serving": [[result(32, 100.0, counters={f"{t}@a": 100.0, f"{t}@b": 300.0,
                                                         f"{st}@a": 10.0, f"{st}@b": 20.0})],
                            [result(64, 200.0)]],
            "mlx_lm.server": [[result(32, 90.0)], [result(64, 90.0)]]}
    assert replica_shares(runs, ["c=32", "c=64"]) == [
        "\nmlx-serving, by replica (busiest first): "
        "c=32: tokens 75%/25%, steps/s 20/10, tokens per step 15.0/10.0"]

    def line_with(counters: dict[str, float]) -> str:
        """The report's line once the first level's run also carries ``counters``."""
        runs["mlx-serving"][0][0].counters.update(counters)
        return replica_shares(runs, ["c=32", "c=64"])[0]

    # with the engine's request timings, the level also says where TTFT went
    f, q, e = ("mlx_serving:requests_finished_total", "mlx_serving:request_queue_seconds_total",
               "mlx_serving:request_engine_ttft_seconds_total")
    rs, rc = ("mlx_serving:time_to_first_token_seconds_sum",
              "mlx_serving:time_to_first_token_seconds_count")
    assert line_with({f"{f}@a": 2.0, f"{f}@b": 2.0, f"{q}@a": 0.1,
                      f"{q}@b": 0.1, f"{e}@a": 0.3, f"{e}@b": 0.5,
                      f"{rs}@router1": 1.2, f"{rc}@router1": 4.0}).endswith(
        "tokens per step 15.0/10.0, TTFT mean client / Router / engine 12 / 300 / 200 ms, "
        "engine queue 50 ms")

    # with the engine threads' seconds by activity, their shares of the level's wall time
    # (two replicas over 1 s: 2 s of engine time in all)
    seconds = 'mlx_serving:engine_thread_seconds_total{activity="%s"}'
    assert line_with({f"{seconds % 'decode'}@a": 0.6,
                      f"{seconds % 'decode'}@b": 0.4,
                      f"{seconds % 'join'}@b": 0.2}).endswith(
        "engine queue 50 ms, engine time % prefill / decode / join / admit / release / tokens "
        "0 / 50 / 10 / 0 / 0 / 0")

    # with the time requests spent at each replica (Serve's count) and in its engine, their
    # mean numbers in flight, busiest replica first: b's routing sees more than b's engine holds
    on_replica, in_engine = ("mlx_serving:request_replica_seconds_total",
                             "mlx_serving:request_engine_seconds_total")
    assert line_with({f"{on_replica}@a": 3.0, f"{on_replica}@b": 5.0,
                      f"{in_engine}@a": 2.9, f"{in_engine}@b": 3.5}).endswith(
        "0 / 50 / 10 / 0 / 0 / 0, in flight per replica / in its engine 5.0/3.5, 3.0/2.9")

    # with the engine threads' and processes' CPU time: the thread's per second it was busy
    # (a: 0.6 s busy, b: 0.4 + 0.2), its process's per second of the level
    thread, process = ("mlx_serving:engine_thread_cpu_seconds_total",
                       "mlx_serving:engine_process_cpu_seconds_total")
    assert line_with({f"{thread}@a": 0.3, f"{thread}@b": 0.6,
                      f"{process}@a": 0.5, f"{process}@b": 1.25}).endswith(
        "3.0/2.9, engine thread CPU per busy s / process CPU per s 1.00/1.25, 0.50/0.50")


def test_guidellm_report_is_read_as_a_load_result():
    def dist(values):
        return {"count": len(values), "mean": statistics.mean(values),
                "percentiles": {"p50": statistics.median(values), "p90": max(values),
                                "p99": max(values)}}

    report = {"benchmarks": [{"duration": 2.0, "metrics": {
        "request_totals": {"successful": 4, "errored": 1, "incomplete": 0, "total": 5},
        "output_token_count": {"successful": {"total_sum": 64}},
        "prompt_token_count": {"successful": {"total_sum": 512}},
        "time_to_first_token_ms": {"successful": dist([10, 20, 30, 40])},
        "inter_token_latency_ms": {"successful": dist([1, 2, 3])},
        "request_latency": {"successful": dist([0.1, 0.2, 0.3, 0.4])}}}]}
    r = load_result(report, concurrency=4)
    assert (r.requests_ok, r.requests_failed, r.output_tok_s, r.requests_s) == (4, 1, 32.0, 2.0)
    assert r.ttft_ms["p50"] == 25 and r.e2e_ms["p99"] == 400 and r.input_tokens == 512
    assert r.errors == {"guidellm_errored": 1}

    spec = scenario("http://h:1", "m", "/tok", concurrency=4, requests=8, warmup=4,
                    prompt_tokens=128, output_tokens=64)["spec"]
    assert spec["profile"]["streams"] == [4] and spec["constraints"][0]["count"] == 12
    assert spec["data"][0] == {"kind": "synthetic_text", "prompt_tokens": 128, "output_tokens": 64}


def test_server_configs_share_the_batch_size(tiny_model_path):
    options = ServerOptions(str(tiny_model_path), max_batch_size=64, replicas=2,
                            gpus_per_replica=1, mlx_lm_args=("--prompt-concurrency", "16"))
    variant = our_config(options)["applications"][0]["args"]["variants"]["stable"]
    assert variant["engine"]["max_batch_size"] == 64
    assert variant["engine"]["prompt_cache_bytes"] > 0  # the shipped default, as mlx_lm's
    assert variant["deployment"]["num_replicas"] == 2
    assert variant["deployment"]["ray_actor_options"]["num_gpus"] == 1
    assert "autoscaling_config" not in variant["deployment"]
    cmd = mlx_lm_command(options, 1234)
    assert cmd[cmd.index("--decode-concurrency") + 1] == "64" and cmd[-2:] == ["--prompt-concurrency", "16"]
    assert eos_logit_bias(str(tiny_model_path)) == {"0": -100.0, "2": -100.0}


def test_our_config_holds_a_sweep_beyond_the_batch(tiny_model_path):
    """A closed-loop level of 256 streams on replicas of batch 64 queues instead of being
    refused: the queue bounds hold it, latency SLOs only alert, and a Router per replica."""
    options = ServerOptions(str(tiny_model_path), max_batch_size=64, replicas=4,
                            max_concurrency=256)
    args = our_config(options)["applications"][0]["args"]
    config = AppConfig.model_validate(args)
    stable = config.variants["stable"]
    assert stable.engine.max_waiting_requests == 256
    assert stable.deployment["max_ongoing_requests"] == 256
    # Serve's queue too: run 25's closed-loop waves overfilled the shipped 64 with 503s
    assert stable.deployment["max_queued_requests"] == 256
    assert config.router["num_replicas"] == 4
    assert config.qos.actions[Slo.TTFT_P95] == [Action.ALERT]
    assert config.qos.actions[Slo.ITL_P95] == [Action.ALERT]
    assert Action.ROLLBACK_CANARY in config.qos.actions[Slo.ERROR_RATE]  # untouched
    shipped = our_config(ServerOptions(str(tiny_model_path)))["applications"][0]["args"]
    assert AppConfig.model_validate(shipped).qos.actions[Slo.TTFT_P95] != [Action.ALERT]


def test_deployment_options_given_apply_after_the_sweep_bounds(tiny_model_path):
    """--deployment max_ongoing_requests=132 caps each replica below the sweep's 256."""
    args = build_parser().parse_args(["bench", "llm", "--compare", "--deployment",
                                      "max_ongoing_requests=132", "--concurrency", "256"])
    options = server_options(args, str(tiny_model_path))
    stable = our_config(options)["applications"][0]["args"]["variants"]["stable"]
    assert stable["deployment"]["max_ongoing_requests"] == 132
    assert stable["engine"]["max_waiting_requests"] == 256


def test_cli_dispatches_bench_llm():
    args = build_parser().parse_args(["bench", "llm", "--url", "http://x", "--model", "m",
                                      "--rate", "1", "2", "--workload", "sharegpt"])
    assert args.func.__module__ == "mlx_serving.bench.llm_args"
    assert (args.rate, args.workload, args.concurrency) == ([1.0, 2.0], "sharegpt", [1, 8, 32])


def test_bench_llm_takes_client_processes():
    def parse(*extra):
        return build_parser().parse_args(["bench", "llm", "--url", "http://x", "--model", "m",
                                          *extra])
    assert parse().client_processes == 1
    assert parse("--client-processes", "4").client_processes == 4
    with pytest.raises(SystemExit):
        parse("--client-processes", "0")


def test_a_busy_load_client_is_reported_and_warned_of():
    idle, busy = result(8, 10.0, client_cpu=0.42), result(512, 9e3, client_cpu=0.97)
    spread = result(512, 2e4, client_cpu=0.91, client_processes=4)
    assert client_use(idle) == "client cpu 0.42 (1 process)"
    assert client_use(spread) == "client cpu 0.91 (4 processes)"
    assert client_use(result(8, 10.0)) == "client cpu - (1 process)"  # not measured
    assert client_bound_warning(idle) is None and client_bound_warning(result(8, 1.0)) is None
    assert client_bound_warning(busy) == (
        "warning: the load client was busy 97% of the level: its numbers may be "
        "client-bound; use --client-processes")
    assert client_bound_warning(spread).endswith("use --client-processes (more than 4)")

    runs = {"ours": [[idle], [busy, spread, busy]], "ours · GuideLLM": [[result(8, 9.0)],
                                                                       [result(512, 9.0)]]}
    assert client_lines(runs, ["c=8", "c=512"]) == [
        "- load client, ours: busiest process's CPU (1.0 = a core) and processes per level: "
        "c=8 0.42 (1), c=512 0.97 (1)"]  # the median run's, as in the table


def test_the_hosts_busy_cpus_are_reported_with_any_stolen_time():
    quiet = result(8, 10.0, client_cpu=0.4, host_busy_cpus=2.5, host_steal=0.0)
    crowded = result(512, 9e3, client_cpu=0.2, client_processes=4, host_busy_cpus=41.25,
                     host_steal=0.031)
    assert client_use(quiet) == "client cpu 0.40 (1 process), host 2.5 CPUs busy"
    assert client_use(crowded) == ("client cpu 0.20 (4 processes), host 41.2 CPUs busy, "
                                   "3.1% stolen")
    assert client_lines({"ours": [[quiet], [crowded]]}, ["c=8", "c=512"])[1] == (
        "- host CPU during each level, ours: c=8 2.5 CPUs busy, "
        "c=512 41.2 CPUs busy, 3.1% stolen")


def test_the_throughput_before_the_drain_is_reported_beside_the_levels():
    full = result(512, 9e3, client_cpu=0.2, steady_tok_s=10_512.25, steady_s=19.5)
    full.duration_s = 24.5
    lines = client_lines({"ours": [[result(8, 10.0, client_cpu=0.4)], [full]]}, ["c=8", "c=512"])
    assert lines[1] == ("- output tok/s before the drain (until the first client sent its last "
                        "request), ours: c=8 -, c=512 10,512.2 (19.5 of 24.5 s)")


@pytest.fixture(scope="module")
def mlx_lm_server(tiny_model_path):
    with start_mlx_lm(ServerOptions(str(tiny_model_path), startup_timeout_s=120)) as endpoint:
        yield endpoint


def test_bench_llm_against_mlx_lm_server(mlx_lm_server, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "run"
    code = bench_main(["--url", mlx_lm_server.url, "--model", mlx_lm_server.model, "--label", "lm",
                       "--model-path", str(tiny_model_path), "--eos-logit-bias", "lm",
                       "--concurrency", "1", "3", "--requests", "6", "--input-tokens", "16",
                       "--output-tokens", "12", "--out", str(out), "--no-progress",
                       "--client-processes", "2"])
    assert code == 0
    printed = capsys.readouterr()
    report = printed.out
    assert "| 1 | lm |" in report and "| 3 | lm |" in report
    host = r", host [0-9.]+ CPUs busy(, [0-9.]+% stolen)?" if sys.platform == "linux" else ""
    assert re.search(rf"lm c=1: .*\(1 process\){host}; load before", printed.err)
    assert re.search(rf"lm c=3: .*\(2 processes\){host}; load before", printed.err)
    assert "- load client, lm: " in report
    assert "- output tok/s before the drain (until the first client sent its last request), " \
        "lm: c=1 " in report
    assert ("- host CPU during each level, lm: c=1 " in report) == (sys.platform == "linux")

    saved = json.loads((out / "results.json").read_text())
    entry = saved["servers"]["lm"]
    assert entry["extra_body"] == {"logit_bias": {"0": -100.0, "2": -100.0}}
    levels = entry["runs"][0]
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    for lv in levels:  # EOS kept out: every response has exactly the tokens asked
        assert (lv["requests_ok"], lv["requests_failed"], lv["requests_short"]) == (6, 0, 0)
        assert lv["output_tokens"] == 6 * 12 and lv["input_tokens"] >= 6 * 16
        assert lv["load_before"] is None or len(lv["load_before"]) == 3
        assert 0 < lv["client_cpu"] <= 4
    # one process per stream at most: c=1 from one, c=3 split over two
    assert [lv["client_processes"] for lv in levels] == [1, 2]
    assert [w["seed"] for w in saved["workloads"]] == [0, 1]
    assert saved["environment"]["mlx-lm"] != "-"
    for png in ("throughput.png", "ttft.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
    assert "![throughput](throughput.png)" in (out / "report.md").read_text()


def test_a_sweep_stopped_midway_keeps_the_levels_it_finished(mlx_lm_server, tmp_path, monkeypatch):
    """A time limit's SIGTERM during the second level: results.json already holds the first
    (it used to be written only after a server's whole sweep, and a killed sweep lost all)."""
    real_run_load, levels_started = llm.run_load, []

    async def stopped_in_the_second_level(*args, **kwargs):
        levels_started.append(kwargs.get("rate"))
        if len(levels_started) == 2:
            llm._exit_on_signal(signal.SIGTERM, None)
        return await real_run_load(*args, **kwargs)

    monkeypatch.setattr(llm, "run_load", stopped_in_the_second_level)
    with pytest.raises(SystemExit) as stopped:
        bench_main(["--url", mlx_lm_server.url, "--model", mlx_lm_server.model, "--label", "lm",
                    "--concurrency", "1", "2", "--requests", "2", "--output-tokens", "4",
                    "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert stopped.value.code == 128 + signal.SIGTERM and len(levels_started) == 2
    kept = json.loads((tmp_path / "results.json").read_text())["servers"]["lm"]["runs"]
    assert [[lv["concurrency"] for lv in run] for run in kept] == [[1]]
    assert kept[0][0]["requests_ok"] == 2 and kept[0][0]["output_tokens"] == 2 * 4


def test_shared_prefix_chats_run_against_mlx_lm_server(mlx_lm_server, tmp_path):
    code = bench_main(["--url", mlx_lm_server.url, "--model", mlx_lm_server.model,
                       "--workload", "shared-prefix", "--prefix-tokens", "24", "--input-tokens", "6",
                       "--output-tokens", "4", "--turns", "2", "--concurrency", "2",
                       "--requests", "6", "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert code == 0
    level = json.loads((tmp_path / "results.json").read_text())["servers"][mlx_lm_server.url]["runs"][0][0]
    assert (level["requests_ok"], level["requests_failed"]) == (6, 0)
    assert level["input_tokens"] > 6 * 24  # every request carried the shared system prompt
    assert not list(Path(tmp_path).glob("*.png"))
