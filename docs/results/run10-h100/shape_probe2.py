"""Which prompt-pass shapes cost a first-use compile: batch rows, length, or both?"""
import sys, time
import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache, KVCache
from mlx_lm.generate import _merge_caches

model, _ = load(sys.argv[1])

def prefill(L, B=8, prior=0):
    caches = []
    for _ in range(B):
        c = make_prompt_cache(model)
        if prior:
            model(mx.zeros((1, prior), mx.uint32), cache=c)
        caches.append(c)
    cache = _merge_caches(caches)
    x = mx.random.randint(10, 1000, (B, L)).astype(mx.uint32)
    mx.eval(x, [c.state for c in cache])
    t = time.perf_counter()
    model(x, cache=cache)
    mx.eval([c.state for c in cache])
    return (time.perf_counter() - t) * 1e3

prefill(128); prefill(128)
print("B varies at L=128:", [(B, round(prefill(128, B)), round(prefill(128, B))) for B in (1, 2, 3, 5, 8, 13, 16)])
print("L=77 B=8 then B=4, B=5:", round(prefill(77, 8)), round(prefill(77, 4)), round(prefill(77, 5)))
print("L=64 multiples:", [(L, round(prefill(L)), round(prefill(L))) for L in (64, 192, 256, 320)])
print("prior cache (prefix hit) 40, L=128:", round(prefill(128, 8, 40)), round(prefill(128, 8, 40)), "prior 55:", round(prefill(128, 8, 55)))
