"""Probe: the in-process engine with lockstep arrivals against jittered ones, with timers
around the engine thread's MLX calls. Not part of the package."""
import argparse, asyncio, json, random, sys, time, threading
from collections import defaultdict
from dataclasses import asdict

import mlx.core as _mx
import importlib; G = importlib.import_module("mlx_lm.generate")
import mlx_lm.models.cache as C

from mlx_serving.bench.compare import engine_counters
from mlx_serving.bench.loadgen import EngineTarget, Workload, run_load
from mlx_serving.bench.serve import stable_config
import mlx_serving.engine.batch as B
import mlx_serving.engine.runner as R
from mlx_serving.engine import Engine, EngineConfig

T = defaultdict(float)
N = defaultdict(int)
pc = time.perf_counter


class TimedMx:
    def __getattr__(self, k):
        return getattr(_mx, k)

    def eval(self, *a):
        t = pc(); r = _mx.eval(*a); T["mx.eval"] += pc() - t; N["mx.eval"] += 1; return r

    def async_eval(self, *a):
        t = pc(); r = _mx.async_eval(*a); T["mx.async_eval"] += pc() - t; N["mx.async_eval"] += 1
        return r


def wrap(cls, name, key):
    orig = getattr(cls, name)

    def f(*a, **k):
        t = pc()
        try:
            return orig(*a, **k)
        finally:
            T[key] += pc() - t; N[key] += 1
    setattr(cls, name, f)


for mod in (G, C, B):
    mod.mx = TimedMx()
wrap(G.GenerationBatch, "extend", "gen.extend")
wrap(G.GenerationBatch, "_step", "gen._step")
wrap(G.GenerationBatch, "filter", "gen.filter")
wrap(G.PromptProcessingBatch, "extend", "prompt.extend")
wrap(B._PromptBatch, "prompt", "prompt.prompt")
wrap(B._PromptBatch, "generate", "prompt.generate")
wrap(C.BatchKVCache, "filter", "kv.filter")
wrap(C.BatchKVCache, "extract", "kv.extract")
wrap(C.BatchKVCache, "extend", "kv.extend")
wrap(C.BatchKVCache, "merge", "kv.merge") if False else None
wrap(B.ServingBatchGenerator, "next", "bg.next")
wrap(G.BatchGenerator, "_make_batch", "bg._make_batch")
wrap(R.ModelRunner, "release_retired", "runner.release_retired")
wrap(R.ModelRunner, "start", "runner.start")


class Jittered:
    def __init__(self, target, jitter_s, seed):
        self.t, self.j, self.rng = target, jitter_s, random.Random(seed)

    async def stream(self, spec):
        if self.j:
            await asyncio.sleep(self.rng.uniform(0, self.j))
        async for n in self.t.stream(spec):
            yield n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests-per-stream", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jitter-ms", type=float, nargs="+", default=[0, 20])
    p.add_argument("--spread", type=float, default=0.0)
    p.add_argument("--engine", action="append", default=[])
    p.add_argument("--json")
    p.add_argument("--pyspy", help="dir: py-spy --native raw profiles of the last repeat")
    p.add_argument("--pyspy-s", type=float, default=5.0)
    a = p.parse_args()
    import yaml
    eng = {k: yaml.safe_load(v) for k, _, v in (e.partition("=") for e in a.engine)}
    cfg = stable_config(a.model, 64, {}, eng)
    variant = cfg["applications"][0]["args"]["variants"]["stable"]
    engine = Engine(EngineConfig.model_validate(variant["engine"]))
    target = EngineTarget(engine)
    n = a.concurrency
    wl = Workload(requests=n * a.requests_per_stream, prompt_tokens=128, max_tokens=128,
                  warmup=min(n, 8), seed=n, max_tokens_spread=a.spread)
    out = []

    async def probe():
        return engine_counters(asdict(engine.stats()))

    async def go():
        for r in range(a.repeats):
            for j in a.jitter_ms:
                if r == 0:
                    await run_load(target, wl, n)  # warm both shapes
                T.clear(); N.clear()
                spy = None
                if a.pyspy and r == a.repeats - 1:
                    import os, subprocess
                    spy = subprocess.Popen(
                        ["py-spy", "record", "--native", "--threads", "--idle", "--rate", "250",
                         "--format", "raw", "-o", f"{a.pyspy}/spy-j{int(j)}.txt",
                         "--pid", str(os.getpid()), "--duration", str(a.pyspy_s)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                    await asyncio.sleep(0.5)
                res = await run_load(Jittered(target, j / 1000, r), wl, n, probe)
                if spy is not None:
                    await asyncio.to_thread(spy.wait)
                c = res.counters
                dsteps = c["steps"] - c["prefill_steps"]
                row = {"repeat": r, "jitter_ms": j, "tok_s": res.output_tok_s,
                       "dur": res.duration_s, "ttft_mean": res.ttft_ms["mean"],
                       "steps": c["steps"], "prefill": c["prefill_steps"],
                       "ms_per_decode": 1000 * c["decode_s"] / max(1, dsteps),
                       "prefill_s": c["prefill_s"], "decode_s": c["decode_s"], "join_s": c["join_s"],
                       "release_s": c["release_s"], "tokens_s": c["tokens_s"],
                       "timers": {k: (round(T[k], 4), N[k]) for k in sorted(T)}}
                out.append(row)
                print(json.dumps(row), flush=True)

    asyncio.run(go())
    engine.shutdown()
    if a.json:
        open(a.json, "w").write(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
