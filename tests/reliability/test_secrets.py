"""No secret reaches a log: API keys and the operator token given through the environment
(docs/DEPLOYMENT.md) appear in none of the Ray session's log files, and neither does a wrong
key a client sent. Keys in the config's ``args`` do (Serve logs an application's args),
which is why the docs keep secrets out of cluster.yaml; that key is the scan's control."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from serve_fixtures import API_KEY, CONFIG_API_KEY, OPERATOR_TOKEN

WRONG_KEY = "sk-wrong-key-a-client-mistyped-0123456789"


def _log_files(cluster) -> list[Path]:
    dirs = {Path(node.get_logs_dir_path()) for node in [cluster.head_node, *cluster.worker_nodes]}
    return [p for d in dirs for p in d.rglob("*") if p.is_file()]


def _holders(files: list[Path], secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in files if needle in p.read_bytes()]


def test_no_log_holds_a_secret_from_the_environment(serve_app, ray_cluster):
    url = f"{serve_app.url}/v1/models"
    for key, status in ((API_KEY, 200), (CONFIG_API_KEY, 200), (WRONG_KEY, 401)):
        r = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == status, (key, r.text)
    serve_app.admin("GET", "/admin/canary/status")   # the operator token, used
    time.sleep(2)   # the replicas' log lines reach their files

    files = _log_files(ray_cluster)
    assert files
    for secret in (API_KEY, OPERATOR_TOKEN, WRONG_KEY):
        assert _holders(files, secret) == [], secret
    # The control: the scan does find a secret that is there (the config's key).
    assert _holders(files, CONFIG_API_KEY)
