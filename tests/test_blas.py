"""A benchmark process started without OpenBLAS restarts itself with it (Linux CPU)."""

import os
import subprocess
import sys

from mlx_serving.engine.blas import openblas_path

PROBE = ("from mlx_serving.engine.blas import ensure_preloaded, is_preloaded\n"
         "ensure_preloaded()\n"
         "import mlx.core\n"
         "print(is_preloaded())\n")


def test_ensure_preloaded_restarts_the_process_with_openblas():
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MLX_SERVING_CUDA", "MLX_SERVING_PRELOAD_RESTARTED")}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    # One line: the first run was replaced, not continued. Where the system has no OpenBLAS
    # (macOS, or Linux without the package), nothing changes.
    assert out == [str(openblas_path() is not None)]
