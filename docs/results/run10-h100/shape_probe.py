"""Does a prompt pass pay a cost per new prompt length? Time prefill passes of 8 prompts."""
import sys, time
import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.generate import _merge_caches

model, _ = load(sys.argv[1])

def prefill(L, B=8):
    cache = _merge_caches([make_prompt_cache(model) for _ in range(B)])
    x = mx.random.randint(10, 1000, (B, L)).astype(mx.uint32)
    mx.eval(x)
    t = time.perf_counter()
    model(x, cache=cache)
    t_build = time.perf_counter() - t
    mx.eval([c.state for c in cache])
    return t_build, time.perf_counter() - t

for L in (128, 128, 128):
    prefill(L)
print("L   first(build/total ms)   again(build/total ms)")
for L in range(100, 140, 3):
    a = prefill(L); b = prefill(L); c = prefill(L)
    print(f"{L:4d}  {a[0]*1e3:6.1f}/{a[1]*1e3:6.1f}   {b[0]*1e3:6.1f}/{b[1]*1e3:6.1f}  {c[0]*1e3:6.1f}/{c[1]*1e3:6.1f}")
