"""Raw decode rate on several GPUs of one host at once: do the GPUs, or busy CPUs, slow a
decode loop down?

Each group runs one process per GPU (``CUDA_VISIBLE_DEVICES``), every process driving mlx-lm's
``BatchGenerator`` over ``--batch`` sequences; once all have loaded the model, they decode
together for ``--window`` seconds and report their decode steps per second and their CPU
seconds per second (a step is host work on one core: building the graph and launching its
kernels, so a loop near 1.0 is bound by its core). ``--cpu-load K`` adds a run of each
group beside K processes busy on a core each, as a serving stack's Routers, proxy and
load client would: spinning in the core's own caches (``--cpu-load-kind spin``), or copying
64 MiB buffers (``memory``), which evicts the shared cache and draws memory bandwidth as a
spin does not. No Ray. ``--driver engine`` decodes through our ``Engine`` instead (its
scheduler thread, detokenizing and streaming every token), ``--driver engine-process`` through
``EngineProcess`` as a replica on a GPU does (the engine in a child process, each step's
tokens forwarded to the parent): together they tell whether what slows replicas beside others
is the decoding, the engine, or the serving path around it.

    python -m mlx_serving.bench.gpu_decode --model PATH --groups 0 0,1 0,1,2,3 --cpu-load 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass


@dataclass
class DecodeRate:
    """One process's decode over the window: steps/s, and its CPU seconds per wall second."""

    group: str
    gpu: str
    cpu_load: int
    steps_s: float
    cpu_per_wall: float
    driver: str = "raw"
    cpu_load_kind: str = "spin"


def decode(model_path: str, batch: int, window_s: float) -> None:
    """Child: load, warm up, print ``ready``, wait for a line on stdin, decode ``batch``
    sequences for ``window_s`` and print the rate as JSON (steps count once every sequence
    decodes, after the prefill)."""
    from mlx_serving.engine import fd_limits  # noqa: F401  isort: skip  (before mlx-lm)
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from mlx_serving.bench.engine import make_prompts

    model, _ = load(model_path)
    prompts = make_prompts(batch, 128, model.args.vocab_size)

    def generator():
        gen = BatchGenerator(model, completion_batch_size=batch, prefill_batch_size=16)
        gen.insert(prompts, max_tokens=[10**6] * batch)
        return gen

    warm = generator()
    for _ in range(40):
        warm.next_generated()
    warm.close()
    print("ready", flush=True)
    sys.stdin.readline()
    gen, end = generator(), time.perf_counter() + window_s
    steps, started, cpu0 = 0, None, 0.0
    while time.perf_counter() < end:
        if len(gen.next_generated()) == batch:
            if started is None:
                started, cpu0 = time.perf_counter(), time.process_time()
            else:
                steps += 1
    if not steps:  # the prefill took the whole window
        print(json.dumps({"error": f"no two steps decoded all {batch} sequences within "
                                   f"{window_s} s: lengthen --window"}), flush=True)
        return
    wall = time.perf_counter() - started
    print(json.dumps({"steps_s": steps / wall,
                      "cpu_per_wall": (time.process_time() - cpu0) / wall}), flush=True)


# Long enough for a 20-s window at 40 steps/s, short enough for a KV reservation of 128
# sequences of an 8B model (19 GB) within the default budget (half of an 80-GB GPU)
_ENGINE_MAX_TOKENS = 1024


def decode_engine(model_path: str, batch: int, window_s: float, in_process: bool) -> None:
    """Child, ``--driver engine[-process]``: as ``decode``, with ``batch`` requests of the
    engine streaming at once; the rate is the engine's steps over the window, which starts
    once every sequence has joined the batch (a step then makes ``batch`` tokens)."""
    from mlx_serving.bench.engine import make_prompts
    from mlx_serving.engine import (
        Engine, EngineConfig, GenerationRequest, ModelConfig, SamplingParams)
    from mlx_serving.engine.process import EngineProcess

    config = EngineConfig(models=[ModelConfig(name="bench", path=model_path)],
                          max_batch_size=batch, prefill_batch_size=16, prompt_cache_bytes=0)
    engine = Engine(config) if in_process else EngineProcess(config)
    prompts = make_prompts(batch, 128, engine.list_models()[0].vocab_size)

    async def stream_all(max_tokens: int, measure: bool) -> dict | None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

        async def one(prompt: list[int]) -> None:
            async for _ in engine.generate(GenerationRequest(prompt=prompt, params=params)):
                pass

        streams = [asyncio.create_task(one(p)) for p in prompts]
        if not measure:
            await asyncio.gather(*streams)
            return None
        try:
            full = await _first_full_step(engine, batch)
            start, wall = time.perf_counter(), 0.0
            while True:  # at least one look, so a window of 0 still ends with stats
                await asyncio.sleep(max(0.0, min(0.1, window_s - wall)))
                end, wall = engine.stats(), time.perf_counter() - start
                if end.finished > full.finished:
                    return {"error": f"a request ended within the {window_s} s window: "
                                     "shorten --window"}
                if wall >= window_s:
                    break
        finally:
            for s in streams:
                s.cancel()
        # the engine's own process: this one, or the child of an EngineProcess
        return {"steps_s": (end.steps - full.steps) / wall,
                "cpu_per_wall": (end.process_cpu_s - full.process_cpu_s) / wall}

    asyncio.run(stream_all(40, measure=False))
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(asyncio.run(stream_all(_ENGINE_MAX_TOKENS, measure=True))), flush=True)


async def _first_full_step(engine, batch: int):
    """The engine's stats once a step has made a token for all ``batch`` sequences."""
    before = engine.stats()
    while True:
        await asyncio.sleep(0.005)
        now = engine.stats()
        if now.steps > before.steps and now.generated_tokens - before.generated_tokens == \
                batch * (now.steps - before.steps):
            return now
        before = now


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def _copy(stop) -> None:
    source, target = bytearray(os.urandom(1 << 20) * 64), bytearray(64 << 20)
    while not stop.is_set():
        target[:] = source


_CPU_LOADS = {"spin": _spin, "memory": _copy}


def run_group(args: argparse.Namespace, gpus: list[str], cpu_load: int) -> list[DecodeRate]:
    """One process per GPU of the group, decoding at the same time, beside ``cpu_load``
    busy processes of ``args.cpu_load_kind``."""
    children = [subprocess.Popen(
        [sys.executable, "-m", "mlx_serving.bench.gpu_decode", "--child", "--model", args.model,
         "--batch", str(args.batch), "--window", str(args.window), "--driver", args.driver],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True) for gpu in gpus]
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_CPU_LOADS[args.cpu_load_kind], args=(stop,),
                                        daemon=True)
                for _ in range(cpu_load)]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a decode process failed to start (exit {child.wait()})")
        for s in spinners:
            s.start()
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        answers = [json.loads(child.stdout.readline()) for child in children]
        for gpu, answer in zip(gpus, answers):
            if "error" in answer:
                raise RuntimeError(f"the decode process on GPU {gpu}: {answer['error']}")
    finally:
        stop.set()
        for child in children:
            child.kill()
            child.wait()
        for s in spinners:
            s.join(5)
    group = ",".join(gpus)
    return [DecodeRate(group, gpu, cpu_load, round(a["steps_s"], 2),
                       round(a["cpu_per_wall"], 2), args.driver, args.cpu_load_kind)
            for gpu, a in zip(gpus, answers)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--groups", nargs="+", default=["0"],
                   help="GPU groups run in turn, e.g. 0 0,1 0,1,2,3")
    p.add_argument("--batch", type=int, default=128, help="sequences each process decodes")
    p.add_argument("--window", type=float, default=20.0, help="seconds of decoding")
    p.add_argument("--cpu-load", type=int, default=0,
                   help="also run each group beside this many processes busy on a core")
    p.add_argument("--cpu-load-kind", choices=sorted(_CPU_LOADS), default="spin",
                   help="what the busy processes do: spin in their core's caches, or copy "
                        "64 MiB buffers (shared cache and memory bandwidth)")
    p.add_argument("--driver", choices=["raw", "engine", "engine-process"], default="raw",
                   help="what decodes: mlx-lm's BatchGenerator in a loop, our Engine, or our "
                        "Engine in a child process (EngineProcess, a GPU replica's)")
    p.add_argument("--json", help="write the rates here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.driver == "raw":
            decode(args.model, args.batch, args.window)
        else:
            decode_engine(args.model, args.batch, args.window, args.driver == "engine")
        return 0
    rates = []
    for loads in ([0, args.cpu_load] if args.cpu_load else [0]):
        for group in args.groups:
            group_rates = run_group(args, group.split(","), loads)
            rates += group_rates
            for r in group_rates:
                print(f"{r.driver}: GPUs {r.group:<10} beside {r.cpu_load:>3} busy CPUs "
                      f"({r.cpu_load_kind if r.cpu_load else '-'}): "
                      f"GPU {r.gpu} {r.steps_s:6.2f} steps/s, process CPU per second "
                      f"{r.cpu_per_wall:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "driver": args.driver, "batch": args.batch,
                       "window_s": args.window, "cpus": os.cpu_count(),
                       "rates": [asdict(r) for r in rates]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
