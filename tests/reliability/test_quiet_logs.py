"""The housekeeping deployments keep their logs for what matters: Serve's access-log line per
call, which for Telemetry (every replica pushes its metrics each second) and the
RolloutController (long polls) was nearly all they wrote, is dropped there, and kept for
the Router, whose calls are the clients' requests. Lines Serve buffers (its throughput mode)
reach the files within a second."""

from __future__ import annotations

import io
import logging
import logging.handlers
import time
from pathlib import Path

import httpx
from support import wait_until

from mlx_serving.deployments.telemetry import drop_access_log, start_log_flusher


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


def test_buffered_serve_log_records_are_written_without_waiting_for_a_full_buffer():
    # Regression: with RAY_SERVE_THROUGHPUT_OPTIMIZED=1, Serve buffers 1,000 records per
    # replica; the Telemetry replica's log file stayed empty, the Router's lines came late.
    written = io.StringIO()
    buffered = logging.handlers.MemoryHandler(capacity=1000, flushLevel=logging.ERROR,
                                              target=logging.StreamHandler(written))
    serve_logger = logging.getLogger("ray.serve")
    saved = serve_logger.handlers, serve_logger.level, serve_logger.propagate
    serve_logger.handlers, serve_logger.propagate = [buffered], False
    serve_logger.setLevel(logging.INFO)
    try:
        start_log_flusher(interval_s=0.05)
        serve_logger.info("request ended: ok")
        wait_until(lambda: "request ended: ok" in written.getvalue(), timeout=5)
    finally:
        serve_logger.handlers, level, serve_logger.propagate = saved
        serve_logger.setLevel(level)


def test_telemetry_writes_no_line_per_push_but_the_router_logs_requests(serve_app,
                                                                        ray_cluster):
    r = httpx.get(f"{serve_app.url}/v1/models", headers=serve_app.headers(), timeout=30)
    assert r.status_code == 200
    time.sleep(3)   # several pushes from every replica, and the lines reach their files

    telemetry = _replica_logs(ray_cluster, "Telemetry")
    assert telemetry, "no Telemetry replica log found"
    assert b"CALL push" not in telemetry and b"CALL streams" not in telemetry
    assert b"/v1/models" in _replica_logs(ray_cluster, "Router")
