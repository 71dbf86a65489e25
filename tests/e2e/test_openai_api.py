"""The application from cluster.yaml, driven over real HTTP with the official openai client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(serve_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_app.url}/v1", api_key=serve_app.api_key, max_retries=0)


MESSAGES = [{"role": "user", "content": "Say something about Ray Serve."}]


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_chat_completion(client):
    out = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_equals_unstreamed(client):
    kwargs = dict(model="demo", messages=MESSAGES, max_tokens=20, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 20
    # The prompt was just served: the prefix cache of at least one replica holds it.
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_continuous_usage_stats_put_usage_in_every_chunk(client):
    # vLLM's extension (GuideLLM sends it): with include_usage, each chunk carries the usage
    # so far; without include_usage it changes nothing, as in vLLM.
    kwargs = dict(model="demo", messages=MESSAGES, max_tokens=20, temperature=0, stream=True,
                  extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **kwargs))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert content and all(c.usage is not None for c in content)
    prompt = chunks[-1].usage.prompt_tokens
    assert prompt > 0 and {c.usage.prompt_tokens for c in content} == {prompt}
    done = [c.usage.completion_tokens for c in content]
    assert done == sorted(done) and 1 <= done[0] and done[-1] <= 20
    assert all(c.usage.total_tokens == prompt + c.usage.completion_tokens for c in content)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    plain = list(client.chat.completions.create(
        stream_options={"include_usage": False, "continuous_usage_stats": True}, **kwargs))
    assert all(c.usage is None for c in plain)


def test_text_completion_streamed_and_not(client):
    out = client.completions.create(model="demo", prompt="def main():", max_tokens=10,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 10
    stream = client.completions.create(model="demo", prompt="def main():", max_tokens=10,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == out.choices[0].text


def test_n_choices_and_seed(client):
    out = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16, n=2,
                                         temperature=1.0, seed=42,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content != out.choices[1].message.content
    assert out.usage.completion_tokens == 32
    again = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16, n=2,
                                           temperature=1.0, seed=42,
                                           extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    streamed = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16,
                                              n=2, temperature=1.0, seed=42, stream=True,
                                              extra_body={"ignore_eos": True})
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in out.choices]


def test_logprobs(client):
    out = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=3,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy
    assert "".join(i.token for i in content) == out.choices[0].message.content
    comp = client.completions.create(model="demo", prompt="x = ", max_tokens=4, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_stop_and_max_completion_tokens(client):
    base = client.chat.completions.create(model="demo", messages=MESSAGES, temperature=0,
                                          max_completion_tokens=30,
                                          extra_body={"ignore_eos": True})
    text = base.choices[0].message.content
    assert base.usage.completion_tokens == 30
    stop = text[8:12]
    if stop.strip() and text.find(stop) == 8:
        cut = client.chat.completions.create(model="demo", messages=MESSAGES, temperature=0,
                                             max_tokens=30, stop=[stop],
                                             extra_body={"ignore_eos": True})
        assert cut.choices[0].message.content == text[:8]
        assert cut.choices[0].finish_reason == "stop"


def test_tokenize_and_detokenize(serve_app):
    h = serve_app.headers()
    tokens = httpx.post(f"{serve_app.url}/tokenize", json={"prompt": "hello world"},
                        headers=h).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(f"{serve_app.url}/detokenize", json={"tokens": tokens["tokens"]},
                      headers=h).json()
    assert text["prompt"] == "hello world"


# -- errors -----------------------------------------------------------------------------------------
def _post(serve_app, body, path="/v1/chat/completions", headers=None, raw=None):
    return httpx.post(f"{serve_app.url}{path}", headers=headers or serve_app.headers(),
                      content=raw if raw is not None else json.dumps(body), timeout=30)


@pytest.mark.parametrize("patch,param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"bogus_field": 1}, "bogus_field"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     "messages[0].content[0].type"),
    ({"stop": [""]}, "stop"),
    ({"stream": True, "stream_options": {"include_usage": True, "bogus_option": True}},
     "stream_options.bogus_option"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": "yes"}},
     "stream_options.continuous_usage_stats"),
])
def test_invalid_values_are_400_naming_the_field(serve_app, patch, param):
    body = {"model": "demo", "messages": MESSAGES, **patch}
    r = _post(serve_app, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"]


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=-1)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert info.value.body["param"] == "model"


def test_bad_json_wrong_types_oversized_and_auth(serve_app):
    r = _post(serve_app, None, raw=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = _post(serve_app, None, raw=b'"a string"')
    assert r.status_code == 400
    r = _post(serve_app, None, raw=b"\xff\xfe{}")
    assert r.status_code == 400
    r = _post(serve_app, None, raw=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code in (400, 413)
    big = json.dumps({"model": "demo", "prompt": "a" * (5 * 2**20)})
    r = _post(serve_app, None, path="/v1/completions", raw=big.encode())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = _post(serve_app, {"model": "demo", "messages": MESSAGES}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{serve_app.url}/v1/models")
    assert r.status_code == 401
    r = httpx.get(f"{serve_app.url}/v1/no-such-endpoint", headers=serve_app.headers())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{serve_app.url}/v1/chat/completions", headers=serve_app.headers())
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_prompt_longer_than_context_is_400(serve_app):
    r = _post(serve_app, {"model": "demo", "prompt": [5] * 200_000, "max_tokens": 1},
              path="/v1/completions")
    assert r.status_code in (400, 413)
    r = _post(serve_app, {"model": "demo", "prompt": [5] * 10, "max_tokens": 10**7},
              path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_health_ready_metrics(serve_app, client):
    assert httpx.get(f"{serve_app.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{serve_app.url}/ready").json() == {"status": "ready"}
    client.completions.create(model="demo", prompt="hi", max_tokens=2)  # latency series exist
    time.sleep(2.5)  # replicas push their registries every second
    text = httpx.get(f"{serve_app.url}/metrics").text
    assert "mlx_serving:time_to_first_token_seconds_bucket" in text
    assert "mlx_serving:num_requests_running" in text
    assert "mlx_serving:engine_pauses_total" in text
    assert "mlx_serving:mlx_active_memory_bytes" in text
    assert "mlx_serving:mlx_cache_memory_bytes" in text
    assert serve_app.metric("mlx_serving:requests_finished_total") >= 1
    assert serve_app.metric("mlx_serving:request_engine_ttft_seconds_total") > 0
    assert (serve_app.metric("mlx_serving:request_replica_seconds_total")
            >= serve_app.metric("mlx_serving:request_engine_seconds_total") > 0)
    assert "mlx_serving:request_queue_seconds_total" in text
    assert 'activity="decode"' in text and "mlx_serving:engine_thread_seconds_total" in text


def test_metrics_cover_every_replica(serve_app, client):
    """/metrics is the application's, whichever Router replica answers the scrape."""
    for _ in range(6):
        client.completions.create(model="demo", prompt="hi", max_tokens=2)
    time.sleep(2.5)  # replicas push their registries every second
    live = set(serve_app.replica_actors())
    for _ in range(10):  # several scrapes: they land on either Router replica
        text = httpx.get(f"{serve_app.url}/metrics").text
        reported = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                    if line.startswith("mlx_serving:num_requests_running{")}
        # A replica killed by another test may linger for a few seconds; live ones never miss.
        assert live <= reported, (live, reported)
    assert len(live) == 2


def test_prompt_tokens_metric_counts_a_prompt_once_for_n_choices(serve_app, client):
    """Regression: with n=2 the prompt was counted once per choice."""
    time.sleep(2.5)  # earlier requests' counts have reached the merged view
    before = serve_app.metric("mlx_serving:prompt_tokens_total")
    out = client.completions.create(model="demo", prompt="count me once", max_tokens=2, n=2)
    time.sleep(2.5)  # replicas push their registries every second
    after = serve_app.metric("mlx_serving:prompt_tokens_total")
    assert out.usage.prompt_tokens > 0 and after - before == out.usage.prompt_tokens


def test_admin_streams_requires_operator_token(serve_app):
    url = f"{serve_app.url}/admin/streams"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 403
    r = httpx.get(url, headers={"Authorization": f"Bearer {serve_app.operator_token}"})
    assert r.status_code == 200 and "streams" in r.json()


def test_disconnect_mid_stream_cancels_the_sequence(serve_app, client):
    stream = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=100_000,
                                            stream=True, extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        received += 1
        if received == 3:
            break
    # The admin view shows the stream while it runs (the Router pushes it every second).
    admin = {"Authorization": f"Bearer {serve_app.operator_token}"}
    deadline = time.monotonic() + 10
    seen = False
    while time.monotonic() < deadline and not seen:
        seen = any(s["tokens"] > 0 and s["replica"]
                   for s in httpx.get(f"{serve_app.url}/admin/streams", headers=admin).json()["streams"])
        time.sleep(0.2)
    assert seen
    stream.close()  # the client goes away
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if serve_app.metric("mlx_serving:num_requests_running") == 0 and not httpx.get(
                f"{serve_app.url}/admin/streams", headers=admin).json()["streams"]:
            break
        time.sleep(0.25)
    assert serve_app.metric("mlx_serving:num_requests_running") == 0
    assert serve_app.metric("mlx_serving:num_requests_paused") == 0


def test_full_serve_queue_is_503_with_retry_after(serve_app):
    """Two replicas × (8 ongoing + 4 queued) admit 24 requests; the rest get 503."""

    async def burst():
        async with httpx.AsyncClient(timeout=60, headers=serve_app.headers()) as http:
            body = {"model": "demo", "prompt": "load", "max_tokens": 200, "ignore_eos": True,
                    "stream": True}

            async def one():
                async with http.stream("POST", f"{serve_app.url}/v1/completions",
                                       json=body) as r:
                    await r.aread()
                    return r.status_code, r.headers.get("retry-after"), r.text

            return await asyncio.gather(*(one() for _ in range(40)))

    results = asyncio.run(burst())
    statuses = [s for s, _, _ in results]
    assert statuses.count(503) > 0 and statuses.count(200) >= 8
    assert set(statuses) <= {200, 503}
    for status, retry_after, text in results:
        if status == 503:
            assert retry_after and int(retry_after) >= 1
            assert json.loads(text)["error"]["code"] == "overloaded"
