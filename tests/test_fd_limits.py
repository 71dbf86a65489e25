"""Importing the engine (and with it mlx-lm) leaves higher file-descriptor limits alone."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

PRINT_LIMITS_AFTER_IMPORT = (
    "import resource\nfrom mlx_serving.engine import Engine\nimport mlx_lm\n"
    "print(*resource.getrlimit(resource.RLIMIT_NOFILE))")
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def limits_after_import(soft: int, hard: int) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", PRINT_LIMITS_AFTER_IMPORT], capture_output=True, text=True,
        check=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    got_soft, got_hard = out.stdout.split()
    return int(got_soft), int(got_hard)


@pytest.mark.skipif(HARD != resource.RLIM_INFINITY and HARD <= 4096,
                    reason="needs a hard limit above mlx-lm's 4096")
def test_higher_limits_are_kept():
    # Regression: mlx_lm.utils sets (2048, 4096) on import; a Ray cluster started by the
    # test process then gave HAProxy too few descriptors to start.
    hard = 8192 if HARD == resource.RLIM_INFINITY else HARD
    assert limits_after_import(3000, hard) == (3000, hard)


def test_a_low_soft_limit_is_still_raised_as_mlx_lm_wants():
    hard = 8192 if HARD == resource.RLIM_INFINITY else HARD
    if hard < 2048:
        pytest.skip("needs a hard limit of at least 2048")
    assert limits_after_import(256, hard) == (2048, hard)
