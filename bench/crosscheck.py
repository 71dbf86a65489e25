"""A second opinion on our load generator: GuideLLM (vLLM project, PyPI ``guidellm``)
driving the same endpoint at the same levels, its results read back as ``LoadResult``.

GuideLLM runs from its own install (``--guidellm PATH`` to its executable: its
dependencies, PyTorch among them, are kept out of ours). It gets a scenario file built
from our workload: synthetic prompts of the same token count (made with the model's own
tokenizer), the same output length (GuideLLM sends ``ignore_eos`` itself), closed loop
at the same concurrency, the same number of requests after as many warm-up requests.

GuideLLM 0.8 always sends ``stream_options.continuous_usage_stats`` (a vLLM extension):
ours honours it (usage in every chunk), mlx_lm.server ignores it, and servers that reject
unknown fields answer 400. ``strip_continuous_usage`` runs GuideLLM with a
``sitecustomize`` that drops that one key from its request bodies, so that every server
does the same work (nothing else changes; usage then comes once, at the end).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

from mlx_serving.bench.loadgen import LoadResult

# Put on GuideLLM's PYTHONPATH (its workers are spawned processes): patches the request
# handlers when, and only when, GuideLLM imports them. Eager imports here would run in
# every process that path reaches, multiprocessing's resource tracker included.
_SITECUSTOMIZE = '''
import sys
from importlib.machinery import PathFinder

_TARGET = "guidellm.backends.openai.request_handlers"


def _stripping(format_):
    def format(self, *args, **kwargs):
        arguments = format_(self, *args, **kwargs)
        options = (arguments.body or {}).get("stream_options")
        if isinstance(options, dict):
            options.pop("continuous_usage_stats", None)
        return arguments
    return format


class _StripContinuousUsage:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _TARGET:
            return None
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            for handler in (module.TextCompletionsRequestHandler,
                            module.ChatCompletionsRequestHandler):
                handler.format = _stripping(handler.__dict__["format"])

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _StripContinuousUsage)
'''


def scenario(url: str, model: str, tokenizer: str, concurrency: int, requests: int, warmup: int,
             prompt_tokens: int, output_tokens: int, chat: bool = True,
             api_key: str | None = None, seed: int = 0, extra_body: dict | None = None) -> dict:
    """A GuideLLM scenario for one closed-loop level of a fixed-length workload;
    ``extra_body`` is merged into every request body (as ``HttpTarget`` does)."""
    backend = {"kind": "openai_http", "target": url, "model": model,
               "request_format": "/v1/chat/completions" if chat else "/v1/completions"}
    if api_key:
        backend["api_key"] = api_key
    if extra_body:
        backend["extras"] = {"body": extra_body}
    return {"spec": {
        "backend": backend,
        "profile": {"kind": "concurrent", "streams": [concurrency],
                    "warmup": {"value": warmup, "mode": "requests"} if warmup else 0},
        "constraints": [{"kind": "max_requests", "count": requests + warmup}],
        "tokenizer": {"kind": "hf_auto", "model": tokenizer},
        "data": [{"kind": "synthetic_text", "prompt_tokens": prompt_tokens,
                  "output_tokens": output_tokens}],
        "seed": {"kind": "static", "value": seed},
    }}


def run_guidellm(exe: str, spec: dict, out_json: Path, *, strip_continuous_usage: bool = False,
                 workers: int = 1, timeout_s: float = 3600) -> subprocess.CompletedProcess:
    """Run GuideLLM on ``spec``, writing its JSON report to ``out_json``. ``workers`` caps
    its client processes (its default is up to 10; one asyncio process, as ours, keeps the
    client's share of a small machine alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenario.json"
        path.write_text(json.dumps(spec))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GUIDELLM__MAX_WORKER_PROCESSES": str(workers)}
        if strip_continuous_usage:
            (Path(tmp) / "sitecustomize.py").write_text(_SITECUSTOMIZE)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (tmp, env.get("PYTHONPATH")) if p)
        log = Path(tmp) / "log.txt"
        with open(log, "w") as out:
            # Its own session, so that every process it spawns goes when it is done.
            proc = subprocess.Popen(
                [exe, "run", "-c", str(path), "--output", f"kind=json,path={out_json}",
                 "--disable-progress"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
            finally:
                _kill_group(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


def _kill_group(proc: subprocess.Popen) -> None:
    """End ``proc`` and whatever it left in its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _ms(distribution: dict, keys: tuple[str, ...], factor: float = 1.0) -> dict[str, float | None]:
    if not distribution.get("count"):
        return dict.fromkeys(keys)
    return {k: round((distribution["mean"] if k == "mean" else distribution["percentiles"][k]) * factor, 3)
            for k in keys}


def load_result(report: dict, concurrency: int) -> LoadResult:
    """Our ``LoadResult`` from GuideLLM's JSON report of one level (its measured window:
    warm-up excluded). Its inter-token latency is its own: per request, (end - first
    token) / (tokens - 1), pooled per token."""
    bench = report["benchmarks"][0]
    m = bench["metrics"]
    totals = m["request_totals"]
    tokens = int(m["output_token_count"]["successful"]["total_sum"])
    failed = totals["errored"] + totals["incomplete"]
    return LoadResult(
        concurrency=concurrency, requests_ok=totals["successful"], requests_failed=failed,
        errors={"guidellm_errored": totals["errored"]} if totals["errored"] else {},
        duration_s=round(bench["duration"], 4), output_tokens=tokens,
        output_tok_s=round(tokens / bench["duration"], 2),
        requests_s=round(totals["successful"] / bench["duration"], 3),
        ttft_ms=_ms(m["time_to_first_token_ms"]["successful"], ("p50", "p90", "p99", "mean")),
        itl_ms=_ms(m["inter_token_latency_ms"]["successful"], ("p50", "p99", "mean")),
        e2e_ms=_ms(m["request_latency"]["successful"], ("p50", "p90", "p99"), 1e3),
        input_tokens=int(m["prompt_token_count"]["successful"]["total_sum"]))
