"""Shared fixtures. Random-weight models are built once into ``<repo>/.cache/models``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# before any test module imports mlx-lm, which would lower this process's file-descriptor
# limits, and with them those of the Ray cluster it starts (engine/fd_limits.py)
from mlx_serving.engine import fd_limits  # noqa: F401, E402
from mlx_serving.deployments.serve_env import serve_env  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No Ray started behind a test's back: once a driver's ray.shutdown() has run, a Serve handle's
# long-poll thread would start Ray again (auto-init), join the session's cluster and make its
# teardown fail ("Removing a node that is connected to this Ray client"). Ray reads it once,
# on import; every Ray call here and in the tests' child processes then needs a ray.init.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
# Serve's mode as `make run` picks it (`make test` sets it already), before anything imports
# ray.serve, which reads it once: the test Ray cluster and this process's handles use it
os.environ.update(serve_env())

pytest_plugins = ["serve_fixtures"]  # the session Ray cluster and the deployed app

MODEL_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"


def cached_model(arch: str = "llama", size: str = "tiny", dtype: str = "float32", seed: int = 0) -> Path:
    """A generated model folder under MODEL_CACHE, made on first use and reused across runs."""
    from mlx_serving.engine.modelgen import ensure_model

    path = MODEL_CACHE / f"{arch}-{size}-{dtype}-s{seed}"
    return ensure_model(path, arch=arch, size=size, dtype=dtype, seed=seed)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return cached_model()


@pytest.fixture(scope="session")
def small_model_path() -> Path:
    return cached_model(size="small")
