"""The engine in a child process (``engine_process: true``) behind Ray Serve.

An application of its own beside the shared one: one stable replica whose engine runs in a
child process. The openai client streams and completes through it, and a client that hangs up
mid-stream frees its sequence in the child. tests/test_engine_process.py tests EngineProcess
itself; this is the path from HTTP through the Router and the replica into the child.
"""

from __future__ import annotations

import openai
import pytest
from ray import serve
from serve_fixtures import side_app_config
from support import wait_until

APP = "engine-process"
PREFIX = "/ep"


@pytest.fixture(scope="module")
def url(serve_app, tmp_path_factory):
    config = side_app_config(serve_app.config, APP, PREFIX,
                             tmp_path_factory.mktemp("engine-process-canary"),
                             stable={"engine_process": True})
    with serve_app.beside(config) as url:
        yield url


@pytest.fixture(scope="module")
def replica(url):
    return serve.get_deployment_handle("LLMServer-stable", app_name=APP)


@pytest.fixture(scope="module")
def client(serve_app, url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=serve_app.api_key, max_retries=0)


def test_the_engine_runs_in_a_child_of_the_replica(replica):
    info = replica.info.remote().result(timeout_s=30)
    assert info["engine_pid"] != info["pid"]
    # Not Ray's worker niceness (15), which the child would inherit (deployments/app.py).
    assert info["engine_niceness"] == 0
    assert [m["id"] for m in info["models"]] == ["demo"]


def test_streamed_and_unstreamed_answers_through_the_child(client):
    messages = [{"role": "user", "content": "tell me a story"}]
    full = client.chat.completions.create(model="demo", messages=messages, max_tokens=12,
                                          seed=7, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(
        model="demo", messages=messages, max_tokens=12, seed=7, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 0

    two = client.completions.create(model="demo", prompt="once upon a time", max_tokens=5,
                                    n=2, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert all(len(c.logprobs.tokens) == 5 for c in two.choices)
    assert two.usage.completion_tokens == 10


def test_disconnect_frees_the_sequence_in_the_child(client, replica):
    stream = client.completions.create(model="demo", prompt="a long one", max_tokens=100_000,
                                       stream=True, extra_body={"ignore_eos": True})
    for received, _ in enumerate(stream, start=1):
        if received == 3:
            break
    assert replica.stats.remote().result(timeout_s=30)["running"] == 1
    stream.close()  # the client goes away

    def idle() -> bool:
        stats = replica.stats.remote().result(timeout_s=30)
        return stats["running"] == stats["waiting"] == stats["paused"] == 0

    wait_until(idle, timeout=20, interval=0.25)
    # Still serving afterwards.
    after = client.completions.create(model="demo", prompt="again", max_tokens=3,
                                      extra_body={"ignore_eos": True})
    assert after.usage.completion_tokens == 3
