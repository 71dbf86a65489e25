"""Bad input: no 5xx, every refusal OpenAI-shaped and naming its problem, valid input served.

Two halves, against the application deployed by ``serve_app``:

- schemathesis, driven by the Router's own ``/openapi.json`` (deployments/openapi.py):
  positive cases (valid by the document) must get a 2xx, negative ones a 4xx, none a 5xx,
  and every answer must match the document. The document cannot state a few rules, and load
  is no rule of the input: a valid request may get something else than a 2xx only for those,
  with their own status and code, when the test can tell from the request that they apply
  (``_answers_besides_2xx``).
- a hand-written corpus of what a fuzzer rarely produces: broken JSON, invalid UTF-8, deep
  nesting, bodies over the size limit, prompts over the context, and the rest.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import schemathesis
import schemathesis.specs.openapi.schemas  # noqa: F401  (see below)
from hypothesis import settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from serve_fixtures import API_KEY

# schemathesis imports its OpenAPI modules when the first schema is loaded. Compiling them
# that late failed once in CI-like runs with CPython 3.11.7's "SystemError: AST constructor
# recursion depth mismatch" (cpython#106905); importing them at collection avoids that.

OPERATIONS = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize",
              "/v1/models"]
MAX_TOKENS = 4       # generated requests ask for at most this many tokens: the run stays short
MAX_CHOICES = 16     # deployments/protocol.py: prompts × n per request
MESSAGES = [{"role": "user", "content": "Hello"}]
ANY = object()


@pytest.fixture(scope="module")
def vocab_size(tiny_model_path) -> int:
    return json.loads((tiny_model_path / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def api_schema(serve_app):
    config = schemathesis.Config.from_dict({
        "seed": 1729,  # the same cases every run
        "generation": {"mode": "all", "max-examples": 15, "database": "none"},
        "phases": {
            "examples": {"enabled": False},  # the document has none
            "stateful": {"enabled": False},
            # Learning from our 4xx answers would steer generation away from what is refused.
            "fuzzing": {"error-feedback": {"enabled": False},
                        "extra-data-sources": {"responses": False}},
        },
        "checks": {
            # Stricter than the built-in one (which lets 401/404/429/5xx pass): see
            # _assert_accepted.
            "positive_data_acceptance": {"enabled": False},
            "negative_data_rejection": {"expected-statuses": ["400", "401", "404", "413"]},
        },
        "auth": {"openapi": {"apiKey": {"bearer": serve_app.api_key}}},
        "request-timeout": 120,
    })
    return schemathesis.openapi.from_url(f"{serve_app.url}/openapi.json", config=config)


@pytest.fixture
def schemathesis_node_id(request):
    """schemathesis 4.32 renames the test node through ``Node._nodeid``, which pytest 9.2
    no longer has (its ``nodeid`` is a property over ``_id``); give it back as a plain
    attribute."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema").include(path=OPERATIONS)


@schema.parametrize()
@settings(deadline=None)
@pytest.mark.usefixtures("schemathesis_node_id")
def test_schemathesis(case, vocab_size):
    positive = case.meta.generation.mode.is_positive
    if positive:
        _keep_generation_short(case)
    response = case.call()
    # Status, content-type and body conformance, negative_data_rejection, ignored_auth, ...
    case.validate_response(response, excluded_checks=[not_a_server_error])
    _assert_not_a_server_error(case, response)
    if positive:
        _assert_accepted(case, response, vocab_size)
    if response.status_code >= 400:
        err = assert_openai_error(response.status_code, response.headers["content-type"][0],
                                  response.json())
        field = _mutated_field(case)
        if field is not None and response.status_code == 400:
            assert field in f"{err['param']} {err['message']}", (field, err)


def _assert_not_a_server_error(case, response) -> None:
    """No 5xx, but for a request's own deadline passing (the client set timeout_s; the
    document allows any positive one): 504 deadline_exceeded, as the built-in check cannot
    tell apart."""
    if response.status_code < 500:
        return
    body = case.body if isinstance(case.body, dict) else {}
    err = response.json().get("error", {}) if response.content else {}
    assert (response.status_code == 504 and err.get("code") == "deadline_exceeded"
            and body.get("timeout_s") is not None), (
        f"server error {response.status_code} {response.text[:1000]}\n"
        f"{case.operation.label} {json.dumps(case.body)[:2000]}")


def _keep_generation_short(case) -> None:
    """Positive cases ask for at most MAX_TOKENS tokens (a valid value stays valid); one
    that sets no limit gets one (the defaults are 16 and the engine's default_max_tokens)."""
    body = case.body
    if not isinstance(body, dict) or case.operation.path not in OPERATIONS[:2]:
        return
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), (int, float)):
            body[field] = min(body[field], MAX_TOKENS)
    if not (body.get("max_tokens") or body.get("max_completion_tokens")):
        body["max_tokens"] = MAX_TOKENS


def _token_ids(case) -> dict[str, list[int]]:
    """The token ids a request carries, by the field the engine names when one is too big."""
    body, path = case.body, case.operation.path
    ids: dict[str, list[int]] = {}
    if path == "/detokenize":
        ids["tokens"] = list(body["tokens"])
    if path not in OPERATIONS[:2]:
        return ids
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
        ids["prompt"] = [t for p in prompt for t in (p if isinstance(p, list) else [p])]
    ids["stop_token_ids"] = list(body.get("stop_token_ids") or [])
    ids["logit_bias"] = [int(k) for k in body.get("logit_bias") or {}]
    return ids


def _choices(case) -> int:
    """Completions a request asks for (prompts × n)."""
    body = case.body
    prompt = body.get("prompt")
    batch = isinstance(prompt, list) and isinstance(prompt[0], (str, list))
    return (len(prompt) if batch else 1) * body.get("n", 1)


def _answers_besides_2xx(case, vocab_size: int) -> list[tuple[int, str, object]]:
    """(status, code, param) of the answers other than a 2xx that a request valid by the
    document may get, when the test can tell from the request that they may apply.

    Refusals for rules a JSON schema cannot state:
    - the prompt's tokens (+ max_tokens) must fit the model's context: 400
      context_length_exceeded (the token count depends on the tokenizer);
    - token ids must lie below the model's vocabulary size, which the Router does not know:
      400 invalid_request naming the field, only when the request has such an id;
    - a completions request asks for at most MAX_CHOICES completions, prompts × n (a product
      of two fields): 400 too_many_choices, only when it asks for more;
    - a request given a deadline (timeout_s) may run out of it: 504 deadline_exceeded.
    Answers to load, not to the input (each with Retry-After), as the session's QoS monitor
    reacts to the test's own traffic on a slow machine:
    - batch-class requests are shed while an SLO is violated: 429 load_shed;
    - a request of several completions may fill a replica's queue (its bounds shrink while an
      SLO is violated): 429 queue_full. One completion on the otherwise idle application
      always fits.
    """
    body, path = case.body, case.operation.path
    allowed: list[tuple[int, str, object]] = []
    if path in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
        allowed.append((400, "context_length_exceeded", ANY))
    for field, ids in _token_ids(case).items():
        if any(t >= vocab_size for t in ids):
            allowed.append((400, "invalid_request", field))
    if path not in OPERATIONS[:2]:
        return allowed
    if path == "/v1/completions" and _choices(case) > MAX_CHOICES:
        allowed.append((400, "too_many_choices", "prompt"))
    if body.get("timeout_s") is not None:
        allowed.append((504, "deadline_exceeded", ANY))
    if body.get("priority") == "batch":
        allowed.append((429, "load_shed", None))
    if _choices(case) > 1:
        allowed.append((429, "queue_full", None))
    return allowed


def _assert_accepted(case, response, vocab_size: int) -> None:
    if 200 <= response.status_code < 300:
        return
    err = response.json()["error"]
    for status, code, param in _answers_besides_2xx(case, vocab_size):
        if (response.status_code, err["code"]) == (status, code) and param in (ANY, err["param"]):
            if status == 429:
                assert "retry-after" in {h.lower() for h in response.headers}, response.headers
            return
    pytest.fail(f"a request valid by the document was refused: {response.status_code} {err}\n"
                f"{case.operation.label} {json.dumps(case.body)[:2000]}")


def _mutated_field(case) -> str | None:
    """The top-level body field a negative case breaks, when it breaks exactly one."""
    meta = case.meta
    data = meta.phase.data if meta is not None else None
    if (not meta.generation.mode.is_negative or data is None
            or getattr(data, "parameter_location", None) != ParameterLocation.BODY
            or len(getattr(data, "mutations", ()) or ()) > 1):
        return None
    match = re.match(r"^/properties/([^/]+)", data.location or "")
    return match.group(1) if match else None


# -- the corpus ------------------------------------------------------------------------------------
def assert_openai_error(status: int, content_type: str, body: dict) -> dict:
    """The body is OpenAI's error shape; a refusal's (4xx) message names the param it blames."""
    assert content_type.startswith("application/json"), body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["code"], err
    if status < 500 and err["param"] is not None:
        assert re.split(r"[.\[]", err["param"])[0] in err["message"], err
    return err


def refused(response: httpx.Response, status: int, *, param=ANY, code: str | None = None,
            mentions: tuple[str, ...] = ()) -> dict:
    """Assert an exact refusal: status, OpenAI body, param, code, words of the message."""
    assert response.status_code == status, response.text
    err = assert_openai_error(status, response.headers["content-type"], response.json())
    if param is not ANY:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    for word in mentions:
        assert word in err["message"], (word, err)
    return err


def post(serve_app, path: str, body=None, *, raw: bytes | None = None,
         headers: dict | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{serve_app.url}{path}", content=content, timeout=120,
                      headers={"Content-Type": "application/json", **serve_app.headers(),
                               **(headers or {})})


def chat(**fields) -> dict:
    return {"model": "demo", "messages": MESSAGES, "max_tokens": 4, **fields}


def completion(**fields) -> dict:
    return {"model": "demo", "prompt": "Hello", "max_tokens": 4, **fields}


@pytest.mark.parametrize("raw,mentions", [
    (b'{"model": "demo",', ("not valid JSON",)),
    (b"", ("not valid JSON",)),
    (b"{'model': 'demo'}", ("not valid JSON",)),
    (b'{"model": "demo", "prompt": "\xff\xfe"}', ("utf-8",)),   # invalid UTF-8 bytes
    (b"\xc0\xaf", ("utf-8",)),                                    # an overlong encoding
    (b"[" * 100_000 + b"]" * 100_000, ("nested too deeply",)),
])
def test_body_that_is_not_json(serve_app, raw, mentions):
    for path in OPERATIONS[:4]:
        refused(post(serve_app, path, raw=raw), 400, param=None, code="invalid_json",
                mentions=mentions)


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"a string"', b"42", b"null", b"true"])
def test_body_that_is_not_an_object(serve_app, raw):
    for path in OPERATIONS[:4]:
        refused(post(serve_app, path, raw=raw), 400, param=None, mentions=("JSON object",))


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", chat(model=5), "model"),
    ("/v1/chat/completions", chat(messages="Hello"), "messages"),
    ("/v1/chat/completions", chat(messages=[{"role": 3}]), "messages.0.role"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]),
     "messages.0.content"),
    ("/v1/chat/completions", chat(n="2"), "n"),
    ("/v1/chat/completions", chat(n=1.5), "n"),
    ("/v1/chat/completions", chat(max_tokens="8"), "max_tokens"),
    ("/v1/chat/completions", chat(max_tokens=True), "max_tokens"),
    ("/v1/chat/completions", chat(temperature="hot"), "temperature"),
    ("/v1/chat/completions", chat(stream=1), "stream"),
    ("/v1/chat/completions", chat(stream="true"), "stream"),
    ("/v1/chat/completions", chat(stop=5), "stop"),
    ("/v1/chat/completions", chat(logit_bias=[1]), "logit_bias"),
    ("/v1/chat/completions", chat(logit_bias={"five": 1}), "logit_bias"),
    ("/v1/chat/completions", chat(logit_bias={"\u0663": 1}), "logit_bias"),  # Arabic-Indic 3
    ("/v1/chat/completions", chat(seed="1"), "seed"),
    ("/v1/chat/completions", chat(user=5), "user"),
    ("/v1/chat/completions", chat(logprobs=1), "logprobs"),
    ("/v1/completions", completion(prompt={}), "prompt"),
    ("/v1/completions", completion(prompt=[1, "a"]), "prompt"),
    ("/v1/completions", completion(prompt=None), "prompt"),
    ("/v1/completions", completion(logprobs=True), "logprobs"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
    ("/detokenize", {"tokens": 5}, "tokens"),
])
def test_wrong_type(serve_app, path, body, param):
    refused(post(serve_app, path, body), 400, param=param)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", chat(), "model"),
    ("/v1/chat/completions", chat(), "messages"),
    ("/v1/completions", completion(), "prompt"),
    ("/detokenize", {"tokens": [1]}, "tokens"),
])
def test_missing_field(serve_app, path, body, param):
    del body[param]
    refused(post(serve_app, path, body), 400, param=param, mentions=("required",))


def test_tokenize_needs_exactly_one_input(serve_app):
    for body in ({}, {"prompt": "a", "messages": MESSAGES}, {"prompt": None}):
        refused(post(serve_app, "/tokenize", body), 400, mentions=("exactly one",))


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", chat(bogus=1), "bogus"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "x", "x": 1}]),
     "messages.0.x"),
    ("/v1/completions", completion(stream=True, stream_options={"usage": True}),
     "stream_options.usage"),
    ("/tokenize", {"prompt": "a", "bogus": 1}, "bogus"),
])
def test_unknown_field(serve_app, path, body, param):
    refused(post(serve_app, path, body), 400, param=param, mentions=("unrecognized", param))


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("response_format", {"type": "json_object"}),
    ("tool_choice", "auto"),
    ("audio", {}),
])
def test_unsupported_openai_field_is_named(serve_app, field, value):
    refused(post(serve_app, "/v1/chat/completions", chat(**{field: value})), 400, param=field,
            mentions=("not supported",))


@pytest.mark.parametrize("body,param", [
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=-1), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (completion(max_tokens=-100), "max_tokens"),
    (chat(n=0), "n"),
    (chat(n=17), "n"),
    (chat(temperature=-0.1), "temperature"),
    (chat(temperature=2.5), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_k=-2), "top_k"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(logit_bias={"5": 101}), "logit_bias"),
    (chat(stop=[""]), "stop"),
    (chat(stop=[str(i) for i in range(17)]), "stop"),
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0].type"),
    (completion(prompt=""), "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=[[]]), "prompt"),
])
def test_value_out_of_range(serve_app, body, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    refused(post(serve_app, path, body), 400, param=param)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", completion(prompt=[5, 10**6]), "prompt"),
    ("/v1/completions", completion(prompt=[[5], [-1]]), "prompt"),
    ("/v1/chat/completions", chat(stop_token_ids=[10**6]), "stop_token_ids"),
    ("/v1/chat/completions", chat(logit_bias={"1000000": 1}), "logit_bias"),
    ("/detokenize", {"tokens": [1, -5]}, "tokens"),
    ("/detokenize", {"tokens": [10**6]}, "tokens"),
])
def test_token_id_outside_the_vocabulary(serve_app, path, body, param):
    refused(post(serve_app, path, body), 400, param=param, mentions=("out of range",))


def test_top_k_over_the_vocabulary_keeps_every_token(serve_app):
    """top_k at or above the vocabulary size filters nothing (it is not an error)."""
    for top_k in (1024, 10**6):
        r = post(serve_app, "/v1/chat/completions", chat(top_k=top_k, temperature=1.0))
        assert r.status_code == 200, r.text


def test_stream_options_without_stream(serve_app):
    for stream in (False, None):
        body = chat(stream_options={"include_usage": True}, **({} if stream is None else
                                                               {"stream": stream}))
        refused(post(serve_app, "/v1/chat/completions", body), 400, param="stream_options",
                mentions=("stream",))


def test_top_logprobs_without_logprobs(serve_app):
    refused(post(serve_app, "/v1/chat/completions", chat(top_logprobs=2)), 400,
            param="top_logprobs", mentions=("logprobs",))


def test_too_many_choices(serve_app):
    body = completion(prompt=["a", "b", "c"], n=6)
    refused(post(serve_app, "/v1/completions", body), 400, param="prompt",
            code="too_many_choices", mentions=("18",))


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers(serve_app, literal):
    raw = b'{"model": "demo", "messages": [{"role": "user"}], "temperature": ' + literal + b"}"
    refused(post(serve_app, "/v1/chat/completions", raw=raw), 400, param="temperature",
            mentions=("finite",))


def test_unknown_model(serve_app):
    for path, body in (("/v1/chat/completions", chat(model="gpt-nope")),
                       ("/v1/completions", completion(model="gpt-nope")),
                       ("/tokenize", {"model": "gpt-nope", "prompt": "a"}),
                       ("/detokenize", {"model": "gpt-nope", "tokens": [1]})):
        refused(post(serve_app, path, body), 404, param="model", code="model_not_found",
                mentions=("gpt-nope",))


def test_prompt_over_the_context(serve_app):
    # 50,000 CJK characters are 150,000 tokens of the tiny model's byte-level tokenizer;
    # its context is 131,072.
    text = "".join(chr(0x4E00 + i * 7919 % 20000) for i in range(50_000))
    r = post(serve_app, "/v1/chat/completions",
             chat(messages=[{"role": "user", "content": text}]))
    refused(r, 400, param="messages", code="context_length_exceeded", mentions=("context",))
    r = post(serve_app, "/v1/completions", completion(prompt=[5] * 140_000))
    refused(r, 400, param="prompt", code="context_length_exceeded", mentions=("context",))
    r = post(serve_app, "/tokenize", {"messages": [{"role": "user", "content": text}]})
    refused(r, 400, param="messages", code="context_length_exceeded")
    r = post(serve_app, "/v1/completions", completion(prompt=[5] * 10, max_tokens=10**7))
    refused(r, 400, param="max_tokens", code="context_length_exceeded")


def test_body_over_the_size_limit(serve_app):
    big = json.dumps(completion(prompt="a" * (5 * 2**20))).encode()
    refused(post(serve_app, "/v1/completions", raw=big), 413, code="body_too_large")

    def chunks():  # no Content-Length: the limit holds while reading
        for i in range(0, len(big), 2**16):
            yield big[i:i + 2**16]

    r = httpx.post(f"{serve_app.url}/v1/completions", content=chunks(), timeout=120,
                   headers={"Content-Type": "application/json", **serve_app.headers()})
    refused(r, 413, code="body_too_large")


@pytest.mark.parametrize("raw,param", [
    (rb'{"model": "demo", "prompt": "a\ud800b"}', "prompt"),
    (rb'{"model": "\udfff", "prompt": "a"}', "model"),
    (rb'{"model": "demo", "prompt": "a", "stop": ["x", "\ud83d"]}', "stop[1]"),
    (rb'{"model": "demo", "prompt": "a", "user": "\udc00\ud800"}', "user"),
    (rb'{"model": "demo", "prompt": "a", "\ud800": 1}', None),
])
def test_lone_surrogate_escapes(serve_app, raw, param):
    """Valid JSON that is not Unicode: it can be neither tokenized nor echoed in an error."""
    refused(post(serve_app, "/v1/completions", raw=raw), 400, param=param,
            mentions=("surrogate",))


def test_lone_surrogate_in_chat_and_tokenizer_bodies(serve_app):
    raw = rb'{"model": "demo", "messages": [{"role": "user", "content": "\ud800"}]}'
    refused(post(serve_app, "/v1/chat/completions", raw=raw), 400,
            param="messages[0].content", mentions=("surrogate",))
    refused(post(serve_app, "/tokenize", raw=rb'{"prompt": "\ud800"}'), 400, param="prompt")


def test_deep_nesting_inside_a_request(serve_app):
    deep = "[" * 500 + "]" * 500
    raw = ('{"model": "demo", "messages": [{"role": "user", "content": %s}]}' % deep).encode()
    refused(post(serve_app, "/v1/chat/completions", raw=raw), 400, param="messages.0.content")
    raw = ('{"model": "demo", "prompt": "a", "tools": %s}' % deep).encode()
    refused(post(serve_app, "/v1/completions", raw=raw), 400, param="tools")
    raw = ('{"model": "demo", "prompt": "a", "bogus": %s}' % deep).encode()
    refused(post(serve_app, "/v1/completions", raw=raw), 400, param="bogus")


def test_tokenize_empty_messages(serve_app):
    """Regression: an empty list reached the engine and failed there (500)."""
    refused(post(serve_app, "/tokenize", {"messages": []}), 400, param="messages")


def test_content_type_is_not_checked_but_the_body_is(serve_app):
    """The Router reads the body as JSON whatever Content-Type says (curl -d sends a form
    type); a body that is not JSON is refused as such."""
    form = post(serve_app, "/v1/completions", raw=b"model=demo&prompt=hi",
                headers={"Content-Type": "application/x-www-form-urlencoded"})
    refused(form, 400, code="invalid_json")
    plain = post(serve_app, "/v1/completions", completion(), headers={"Content-Type": "text/plain"})
    assert plain.status_code == 200, plain.text


def test_wrong_method_names_the_allowed_ones(serve_app):
    """405 carries Allow (RFC 9110), as an OpenAI-shaped error."""
    for method, path, allow in (("PUT", "/v1/completions", "POST"),
                                ("GET", "/v1/chat/completions", "POST"),
                                ("DELETE", "/v1/models", "GET")):
        r = httpx.request(method, f"{serve_app.url}{path}", headers=serve_app.headers(),
                          timeout=30)
        refused(r, 405, code="method_not_allowed")
        assert r.headers.get("allow") == allow, r.headers


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Bearer", "Basic dGVzdA==",
                                           API_KEY])  # the right key without "Bearer"
def test_missing_or_wrong_api_key(serve_app, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", completion()),
                       ("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        r = httpx.post(f"{serve_app.url}{path}", json=body, headers=headers, timeout=30)
        refused(r, 401, param=None, code="invalid_api_key", mentions=("API key",))
    r = httpx.get(f"{serve_app.url}/v1/models", headers=headers, timeout=30)
    refused(r, 401, code="invalid_api_key")


def test_the_corpus_baseline_is_served(serve_app):
    """The bodies the corpus breaks are valid as they stand (3.0 is an integer, as in JSON
    Schema)."""
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", completion()),
                       ("/v1/completions", completion(n=2.0, max_tokens=3.0))):
        r = post(serve_app, path, body)
        assert r.status_code == 200, r.text
