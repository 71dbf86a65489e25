"""Greedy output and logprobs of the engine equal mlx-lm's own generator, alone and batched."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest
from mlx_lm import load, stream_generate
from support import chat, collect, wait_until

from mlx_serving.engine import Engine, EngineConfig, ModelConfig

PROMPTS = [
    "Tell me about continuous batching.",
    "def fibonacci(n):",
    "Write a short poem about the sea",
    "What is 2 + 2?",
    "List three colours",
    "import os\nimport sys\n",
    "The quick brown fox",
    "Explain KV caches like I am five.",
    "Once upon a time",
    "SELECT * FROM users WHERE",
    "Translate 'hello' into French",
    "class Engine:",
    "Why is the sky blue?",
    "for i in range(10):",
    "A haiku about Ray Serve",
    "Summarise the plot of Hamlet in one line and then say why",
]
REF_TOKENS = 64


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    eng = Engine(EngineConfig(models=[ModelConfig(name="tiny", path=str(tiny_model_path))],
                              max_batch_size=16, prefill_batch_size=4, prompt_cache_bytes=0))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def references(tiny_model_path):
    """Tokens and chosen-token logprobs from mlx_lm.stream_generate (greedy)."""
    model, tokenizer = load(str(tiny_model_path))
    refs = []
    for content in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        tokens, logprobs = [], []
        for r in stream_generate(model, tokenizer, mx.array(ids), max_tokens=REF_TOKENS):
            tokens.append(r.token)
            logprobs.append(r.logprobs[r.token].item())
        refs.append((tokens, logprobs))
    return refs


def test_references_are_long_and_varied(references):
    for tokens, _ in references:
        assert len(tokens) == REF_TOKENS  # no early EOS: the comparison covers 64 tokens
        assert len(set(tokens)) >= 16


def _check(out, ref):
    tokens, logprobs = ref
    assert out.token_ids[: len(tokens)] == tokens
    got = [lp.logprob for lp in out.logprobs[: len(tokens)]]
    assert got == pytest.approx(logprobs, abs=1e-4)


def test_single_request_matches_mlx_lm(engine, references):
    out = asyncio.run(collect(engine, chat(PROMPTS[0], max_tokens=REF_TOKENS, temperature=0,
                                           logprobs=True)))
    _check(out, references[0])
    assert out.final.finish_reason.value == "length"
    assert out.final.usage.completion_tokens == REF_TOKENS


def test_sixteen_staggered_requests_match_mlx_lm(engine, references):
    """16 requests of different lengths join a running batch at different steps."""

    async def run():
        tasks = []
        for i, content in enumerate(PROMPTS):
            # Each request waits until the previous one has produced output, so they join the
            # batch mid-generation; max_tokens differ so they also leave at different steps.
            req = chat(content, max_tokens=REF_TOKENS + 3 * i, temperature=0, logprobs=True)
            started = asyncio.Event()
            tasks.append(asyncio.create_task(collect(engine, req, started)))
            await started.wait()
        return await asyncio.gather(*tasks)

    outs = asyncio.run(run())
    for out, ref in zip(outs, references):
        _check(out, ref)
    # The last sequence's slot is released within the engine turn that ended it; its reader
    # (another thread) may see the end first.
    wait_until(lambda: engine.stats().running == 0 and engine.stats().in_batch == 0,
               timeout=10)
