"""Quality of service over real HTTP: priority classes, deadlines and the circuit breaker."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from support import wait_until

CHAT = "/v1/chat/completions"


def post(app, body: dict, headers: dict | None = None, path: str = CHAT) -> httpx.Response:
    return httpx.post(f"{app.url}{path}", json=body, timeout=60,
                      headers={**app.headers(), **(headers or {})})


def chat_body(**fields) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 8, "temperature": 0, **fields}


# -- priority classes --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["body", "header"])
def test_batch_class_requests_are_served(serve_app, where):
    r = (post(serve_app, chat_body(priority="batch")) if where == "body"
         else post(serve_app, chat_body(), {"X-Priority": "batch"}))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("headers, body, param", [
    ({"X-Priority": "urgent"}, {}, "X-Priority"),
    ({"X-Request-Timeout": "soon"}, {}, "X-Request-Timeout"),
    ({"X-Request-Timeout": "-1"}, {}, "X-Request-Timeout"),
    ({}, {"priority": "urgent"}, "priority"),
    ({}, {"timeout_s": 0}, "timeout_s"),
    # A malformed header is refused even where the body's field wins over it.
    ({"X-Priority": "urgent"}, {"priority": "batch"}, "X-Priority"),
    ({"X-Request-Timeout": "soon"}, {"timeout_s": 30}, "X-Request-Timeout"),
])
def test_bad_priority_or_deadline_is_a_400_naming_it(serve_app, headers, body, param):
    r = post(serve_app, chat_body(**body), headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]


# -- deadlines ---------------------------------------------------------------------------------------
def test_a_request_past_its_deadline_is_a_504(serve_app):
    r = post(serve_app, chat_body(max_tokens=1500, ignore_eos=True, timeout_s=0.05))
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"


def test_a_stream_past_its_deadline_ends_with_an_error_event(serve_app):
    events = stream_events(serve_app, chat_body(max_tokens=1500, ignore_eos=True, stream=True),
                           {"X-Request-Timeout": "0.3"})
    assert events[-1] != "[DONE]"
    assert events[-1]["error"]["code"] == "deadline_exceeded"


def test_a_deadline_counts_from_the_routers_arrival_not_the_replicas(serve_app):
    """Time a request spends before its replica takes it counts against its deadline: with
    1.5 s injected before each request reaches the engine, a 1 s deadline has passed on
    arrival, so the request ends while waiting, with no token generated (counted from the
    replica's arrival instead, it would have run for a second)."""
    delayed = [{"name": "LLMServer-stable", "user_config": {"fault": {"delay_ms": 1500}}}]
    serve_app.deploy(delayed)
    try:
        r = None
        for _ in range(20):   # until every replica has the new config
            started = time.monotonic()
            r = post(serve_app, chat_body(max_tokens=1500, ignore_eos=True, timeout_s=1.0))
            if time.monotonic() - started >= 1.4:
                break
        assert r.status_code == 504, r.text
        error = r.json()["error"]
        assert error["code"] == "deadline_exceeded" and "waiting" in error["message"], error
    finally:
        serve_app.deploy()


# -- circuit breaker ---------------------------------------------------------------------------------
def test_a_failing_variant_opens_its_circuit_then_closes_once_healthy(serve_app):
    """Fault injection makes every stable request fail: each Router's breaker opens after
    consecutive_failures and answers fast 503s (circuit_open) instead of calling the
    replicas; once the fault is gone, half-open probes succeed and close it again."""
    faulty = [{"name": "LLMServer-stable", "user_config": {"fault": {"abort_percent": 100}}}]
    serve_app.deploy(faulty)
    try:
        codes = []
        for _ in range(60):  # both Router replicas must see their 5 failures
            r = post(serve_app, chat_body())  # 200 until every replica has the new config
            codes.append(r.json()["error"]["code"] if r.status_code != 200 else "ok")
            if codes[-3:] == ["circuit_open"] * 3:
                break
        assert "injected_fault" in codes and codes[-1] == "circuit_open", codes
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        wait_until(lambda: serve_app.metric("mlx_serving:circuit_transitions_total") >= 1,
                   timeout=15, interval=0.5)  # Routers push their metrics once a second
    finally:
        serve_app.deploy()

    assert_served_again(serve_app)


def test_failures_after_the_first_token_count_against_the_circuit(serve_app):
    """Streams that break after their first tokens are failures of their backend too: the
    breaker takes a call's verdict when the call ends, not at its first chunk (a replica that
    fails every stream mid-way once kept its circuit closed)."""
    faulty = [{"name": "LLMServer-stable",
               "user_config": {"fault": {"abort_percent": 100, "abort_after_tokens": 1}}}]
    serve_app.deploy(faulty)
    try:
        for _ in range(20):   # until every replica has the new config
            events = stream_events(serve_app, chat_body(stream=True, logprobs=True))
            if events[-1] != "[DONE]":
                break
        assert events[-1] != "[DONE]", events
        assert any(e.get("choices") and e["choices"][0]["logprobs"]
                   for e in events[:-1]), events   # tokens first, then the failure
        assert events[-1]["error"]["code"] == "injected_fault", events
        codes = []
        for _ in range(60):
            r = post(serve_app, chat_body())
            codes.append(r.json()["error"]["code"] if r.status_code != 200 else "ok")
            if codes[-3:] == ["circuit_open"] * 3:
                break
        assert "injected_fault" in codes and codes[-1] == "circuit_open", codes
        assert r.status_code == 503
    finally:
        serve_app.deploy()
    assert_served_again(serve_app)


def stream_events(app, body: dict, headers: dict | None = None) -> list:
    """The events of one streamed request, JSON parsed; the end marker stays "[DONE]"."""
    with httpx.stream("POST", f"{app.url}{CHAT}", json=body, timeout=60,
                      headers={**app.headers(), **(headers or {})}) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def assert_served_again(app) -> None:
    """Once a fault is gone, half-open probes close the circuits: requests succeed again."""
    deadline = time.monotonic() + 60
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(post(app, chat_body()).status_code)
        if statuses[-6:] == [200] * 6:
            break
        time.sleep(0.5)
    assert statuses[-6:] == [200] * 6, statuses
