"""Structured logs that follow a request from Router to replica."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx


def _log_dir() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def _json_lines(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def _deployment(record: dict) -> str:
    return record.get("deployment", "").removeprefix("mlx-serving_")


def _records_with(request_id: str, timeout: float = 30.0) -> list[dict]:
    """Serve's JSON log records carrying ``request_id``, once the Router's and the
    LLMServer's last lines about it are written (log files are flushed lazily: with Serve's
    throughput mode, every second)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for f in (_log_dir() / "serve").glob("replica_*.log")
                 for r in _json_lines(f) if r.get("request_id") == request_id]
        ended = {_deployment(r) for r in found
                 if r.get("finish_reason") or r["message"].startswith("request ended")}
        if {"Router", "LLMServer-stable"} <= ended or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_a_request_id_follows_the_request_from_router_to_replica(serve_app):
    request_id = f"trace-{uuid.uuid4().hex}"
    r = httpx.post(f"{serve_app.url}/v1/chat/completions", timeout=60,
                   headers={**serve_app.headers(), "X-Request-ID": request_id},
                   json={"model": "demo", "max_tokens": 4, "temperature": 0,
                         "messages": [{"role": "user", "content": "trace me"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == request_id

    records = _records_with(request_id)
    by_deployment = {}
    for record in records:
        by_deployment.setdefault(_deployment(record), []).append(record)
    router = [r["message"] for r in by_deployment.get("Router", [])]
    server = by_deployment.get("LLMServer-stable", [])
    assert "request ended: ok" in router, records
    ended = [r for r in server if r.get("finish_reason")]
    assert len(ended) == 1, records
    assert ended[0]["engine_request_id"] in ended[0]["message"]
    assert ended[0]["completion_tokens"] == 4
    assert any(r["message"].endswith("accepted") for r in server), records

