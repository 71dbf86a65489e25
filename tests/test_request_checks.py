"""The Router's checks of a request's credentials, before anything reaches a variant."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from mlx_serving.deployments.errors import HTTPError
from mlx_serving.deployments.request_checks import Credentials


def request(authorization: str | None = None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def refusal(check, req) -> tuple[int, str]:
    with pytest.raises(HTTPError) as info:
        check(req)
    return info.value.status, info.value.code


def test_clients_need_one_of_the_api_keys_when_there_are_any():
    keyed = Credentials(["k1", "k2"], None)
    keyed.check_client(request("Bearer k2"))
    keyed.check_client(request("bearer  k1 "))
    for auth in (None, "Bearer", "Bearer k3", "k1", "Basic k1"):
        assert refusal(keyed.check_client, request(auth)) == (401, "invalid_api_key"), auth
    Credentials([], None).check_client(request())  # no keys: open


def test_the_admin_api_needs_the_operator_token_and_is_off_without_one():
    creds = Credentials([], "op-secret")
    creds.check_operator(request("Bearer op-secret"))
    assert refusal(creds.check_operator, request()) == (401, "missing_operator_token")
    assert refusal(creds.check_operator, request("Bearer nope")) == (403, "invalid_operator_token")
    off = Credentials(["k1"], None)
    assert refusal(off.check_operator, request("Bearer k1")) == (403, "admin_disabled")
