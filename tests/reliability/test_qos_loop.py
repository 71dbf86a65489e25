"""The QoS loop end to end, on an application of its own beside the shared one.

Its SLO is one no request can meet (TTFT p95 under 1 ms), so a handful of requests make the
QoS monitor (in the RolloutController) see a violation: the Routers' samples reach it, it
reports the violation and a shed_batch directive (admin API and /metrics), the directive
reaches the Routers with the routing table, and batch-class requests are then refused with
429 load_shed and Retry-After while interactive ones are still served. The shared test
application runs without the monitor (its tests must not be shed), hence the second app.
"""

from __future__ import annotations

import httpx
import pytest
from serve_fixtures import side_app_config
from support import wait_until

APP = "qos-loop"
PREFIX = "/qos"


@pytest.fixture(scope="module")
def qos_url(serve_app, tmp_path_factory):
    config = side_app_config(
        serve_app.config, APP, PREFIX, tmp_path_factory.mktemp("qos-canary"),
        qos={"enabled": True,
             "slo": {"ttft_p95_s": 0.001, "itl_p95_s": None, "error_rate": None,
                     "window_s": 120, "min_samples": 3},
             "actions": {"ttft_p95": ["shed_batch", "alert"]},
             "recover_after_s": 600})
    with serve_app.beside(config) as url:
        yield url


def _complete(app, url: str, tag: str, priority: str = "interactive") -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60,
                      headers={**app.headers(), "X-Priority": priority},
                      json={"model": "demo", "prompt": f"{tag} once upon a time",
                            "max_tokens": 4, "ignore_eos": True})


def _qos(app, url: str) -> dict:
    r = httpx.get(f"{url}/admin/qos", timeout=30,
                  headers={"Authorization": f"Bearer {app.operator_token}"})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_an_slo_violation_sheds_batch_requests(serve_app, qos_url):
    for i in range(6):
        r = _complete(serve_app, qos_url, f"sample {i}")
        assert r.status_code == 200, r.text

    # The monitor sees the violation and directs the stable variant to shed batch work.
    reports = []
    wait_until(lambda: reports.append(_qos(serve_app, qos_url)) or _sheds(reports[-1]),
               timeout=90, interval=1.0)
    report = reports[-1]["report"]
    assert "ttft_p95" in report["variants"]["stable"]["violated"], report
    assert any(a["slo"] == "ttft_p95" and a["variant"] == "stable"
               for a in report["alerts"]), report

    # The Routers get the directive with the routing table: batch-class work is refused...
    answers = []
    wait_until(lambda: answers.append(_complete(serve_app, qos_url, "batch", "batch"))
               or answers[-1].status_code == 429, timeout=60, interval=1.0)
    refused = answers[-1]
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "load_shed"), error
    assert int(refused.headers["retry-after"]) >= 1
    # ...interactive work is still served, and the application's metrics show the action.
    assert _complete(serve_app, qos_url, "interactive after").status_code == 200
    # (The RolloutController pushes its gauges to Telemetry periodically, so /metrics may
    # show the action a push after the Routers act on it.)
    wait_until(lambda: _shows_shedding(httpx.get(f"{qos_url}/metrics", timeout=30).text),
               timeout=30, interval=1.0)
    # The shared application beside it is untouched.
    assert httpx.get(f"{serve_app.url}/ready", timeout=10).status_code == 200


def _shows_shedding(metrics: str) -> bool:
    return any(line.startswith("mlx_serving:qos_shed_batch{") and 'variant="stable"' in line
               and line.rsplit(" ", 1)[1] in ("1", "1.0") for line in metrics.splitlines())


def _sheds(body: dict) -> bool:
    report = body.get("report") or {}
    directive = (report.get("directives") or {}).get("stable") or {}
    return bool(directive.get("shed_batch"))
