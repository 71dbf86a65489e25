"""The Router's reading of a request's priority class and deadline (body fields and headers)."""

from __future__ import annotations

import pytest

from mlx_serving.deployments.errors import HTTPError
from mlx_serving.deployments.protocol import ChatCompletionRequest
from mlx_serving.deployments.request_checks import service_class


def body(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


@pytest.mark.parametrize("fields, headers, expected", [
    ({}, {}, ("interactive", None)),
    ({}, {"x-priority": " Batch ", "x-request-timeout": "2.5"}, ("batch", 2.5)),
    ({"priority": "interactive", "timeout_s": 9}, {"x-priority": "batch",
                                                   "x-request-timeout": "2"}, ("interactive", 9)),
])
def test_body_fields_win_over_headers(fields, headers, expected):
    assert service_class(body(**fields), headers) == expected


@pytest.mark.parametrize("fields, headers, param", [
    ({}, {"x-priority": "urgent"}, "X-Priority"),
    ({"priority": "batch"}, {"x-priority": "urgent"}, "X-Priority"),
    ({}, {"x-request-timeout": "inf"}, "X-Request-Timeout"),
    ({"timeout_s": 5}, {"x-request-timeout": "soon"}, "X-Request-Timeout"),
])
def test_a_malformed_header_is_refused_even_when_the_body_wins(fields, headers, param):
    with pytest.raises(HTTPError) as info:
        service_class(body(**fields), headers)
    assert info.value.status == 400 and info.value.param == param
