"""OpenBLAS for MLX's Linux CPU backend.

The ``mlx-cpu`` wheel links a bundled reference BLAS: fp32 matmuls run at ~6 GFLOP/s.
Preloading the system's pthread OpenBLAS overrides its symbols (~195 GFLOP/s on the same
2-core machine). A preload must happen before the process starts, so this module only finds
the library and builds the environment; ``make`` and Ray's ``runtime_env`` apply it.

``python -m mlx_serving.engine.blas --env`` prints ``LD_PRELOAD=...`` (or nothing).
"""

from __future__ import annotations

import glob
import os
import sys

_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def openblas_path() -> str | None:
    """The system's OpenBLAS shared library, if one is installed (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    for pattern in _CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def preload_env() -> dict[str, str]:
    """Environment variables that make a new process use OpenBLAS (empty if not applicable).

    Not applied with the CUDA backend (``MLX_SERVING_CUDA=1``), where matmuls run on the GPU.
    """
    if os.environ.get("MLX_SERVING_CUDA") == "1":
        return {}
    path = openblas_path()
    if path is None:
        return {}
    current = os.environ.get("LD_PRELOAD", "")
    if path in current.split(":"):
        return {"LD_PRELOAD": current}
    return {"LD_PRELOAD": f"{path}:{current}" if current else path}


def is_preloaded() -> bool:
    """Whether OpenBLAS is mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            return "libopenblas" in maps.read()
    except OSError:
        return False


def ensure_preloaded() -> None:
    """Restart this process with OpenBLAS preloaded if it should be and is not.

    For benchmarks that run an engine in their own process beside servers started with
    ``preload_env()``: without it, the in-process side would use the wheel's slow BLAS.
    Replaces the process (``os.execve``) with the same command line; at most once.
    """
    env = preload_env()
    if not env or is_preloaded() or os.environ.get(_RESTARTED):
        return
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **env, _RESTARTED: "1"})


_RESTARTED = "MLX_SERVING_PRELOAD_RESTARTED"


if __name__ == "__main__":
    if "--env" in sys.argv[1:]:
        print(" ".join(f"{k}={v}" for k, v in preload_env().items()))
    else:
        print(openblas_path() or "OpenBLAS not found")
