"""The housekeeping deployments keep their logs for what matters: Serve's access-log line per
call, which for Telemetry (every replica pushes its metrics each second) and the
RolloutController (long polls) was nearly all they wrote, is dropped there, and kept for
the Router, whose calls are the clients' requests."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx

from mlx_serving.deployments.telemetry import drop_access_log


def _replica_logs(cluster, deployment: str) -> bytes:
    dirs = {Path(node.get_logs_dir_path()) for node in [cluster.head_node, *cluster.worker_nodes]}
    return b"".join(p.read_bytes() for d in dirs
                    for p in d.rglob(f"replica_mlx-serving_{deployment}_*.log"))


def test_access_log_records_are_dropped_and_others_kept():
    def record(**extra) -> logging.LogRecord:
        r = logging.LogRecord("ray.serve", logging.INFO, __file__, 1, "CALL push OK 1.2ms",
                              None, None)
        r.__dict__.update(extra)
        return r

    assert not drop_access_log(record(serve_access_log=True))
    assert drop_access_log(record(serve_access_log=False))
    assert drop_access_log(record())


def test_telemetry_writes_no_line_per_push_but_the_router_logs_requests(serve_app,
                                                                        ray_cluster):
    r = httpx.get(f"{serve_app.url}/v1/models", headers=serve_app.headers(), timeout=30)
    assert r.status_code == 200
    time.sleep(3)   # several pushes from every replica, and the lines reach their files

    telemetry = _replica_logs(ray_cluster, "Telemetry")
    assert telemetry, "no Telemetry replica log found"
    assert b"CALL push" not in telemetry and b"CALL streams" not in telemetry
    assert b"/v1/models" in _replica_logs(ray_cluster, "Router")
