"""Summarise py-spy raw profiles: the engine thread's time by leaf frame and by a few
chosen frames anywhere in the stack."""
import sys
from collections import Counter

KEYS = ["_step", "prompt", "extend", "filter", "extract", "release_retired", "async_eval",
        "eval", "tolist", "__call__", "_on_token", "_push", "_wake_readers", "_drain_inbox",
        "cudaLaunchKernel", "cuLaunchKernel", "cudaStreamSynchronize", "cudaEventSynchronize",
        "cudaMalloc", "cudaFree", "cudaMallocAsync", "cudaFreeAsync", "take_gil", "drop_gil",
        "sched_yield", "futex", "pthread_cond_wait", "cudaGraphLaunch", "cuGraphLaunch"]
for path in sys.argv[1:]:
    leaf, anywhere, total = Counter(), Counter(), 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        if "mlx-engine" not in stack.split(";")[0] and "mlx-engine" not in stack[:200]:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1][:90]] += n
        names = set()
        for f in frames:
            for k in KEYS:
                if f.startswith(k + " ") or f.startswith(k + "(") or f == k or (" " + k + " ") in f \
                        or f.split(" ")[0].endswith(k):
                    names.add(k)
        for k in names:
            anywhere[k] += n
    print(f"== {path}: {total} engine-thread samples")
    for k, v in anywhere.most_common():
        print(f"  {100*v/total:5.1f}%  {k}")
    print("  -- leaves")
    for k, v in leaf.most_common(25):
        print(f"  {100*v/total:5.1f}%  {k}")
