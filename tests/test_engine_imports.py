"""What the engine package imports: its plain types without MLX, its engine with the guard."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("mlx.core", "mlx_lm", "transformers")


def modules_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\n"
         f"print(*[m for m in {HEAVY!r} if m in sys.modules])"],
        capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.split()


@pytest.mark.parametrize("module", [
    "mlx_serving.deployments.router",        # every Router replica
    "mlx_serving.deployments.rollout_controller",
    "mlx_serving.deployments.errors",
    "mlx_serving.deployments.protocol",
])
def test_the_engines_plain_types_import_neither_mlx_nor_mlx_lm(module):
    # Regression: the engine package imported every module (and mlx-lm, transformers and
    # the Python's torch with them) for its errors alone: each Router replica paid ~15 s of
    # CPU for it on a GPU host whose Python had torch.
    assert modules_after(f"import {module}") == []


def test_the_engine_is_there_by_name_with_mlx_lm():
    code = ("from mlx_serving.engine import Engine, EngineError, SamplingParams\n"
            "import mlx_serving.engine as e\n"
            "assert e.Engine is Engine and 'Engine' in dir(e) and 'Engine' in e.__all__\n"
            "assert Engine.__module__ == 'mlx_serving.engine.engine'\n")
    assert modules_after(code) == list(HEAVY)


def test_an_unknown_name_is_an_attribute_error():
    import mlx_serving.engine as engine
    with pytest.raises(AttributeError, match="has no attribute 'Engin'"):
        engine.Engin  # noqa: B018
