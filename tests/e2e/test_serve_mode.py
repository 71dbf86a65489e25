"""The test cluster runs in the Serve mode that `make run` picks (deployments/serve_env.py)."""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest

from mlx_serving.deployments.serve_env import describe


def _haproxy_running() -> bool:
    found = subprocess.run(["pgrep", "-f", "haproxy"], capture_output=True, text=True)
    return bool(found.stdout.strip())


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep")
def test_the_cluster_runs_in_the_mode_make_run_picks(serve_app):
    r = httpx.get(f"{serve_app.url}/health", timeout=30)
    assert r.status_code == 200
    high_throughput = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    assert high_throughput == describe().startswith("Serve's high-throughput mode")
    assert _haproxy_running() == high_throughput, describe()
