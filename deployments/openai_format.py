"""Turning wire chunks into OpenAI response bodies and SSE events."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mlx_serving.deployments.protocol import UsageInfo
from mlx_serving.deployments.wire import Chunk, TokenInfo


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def chat_logprobs(infos: list[TokenInfo]) -> dict:
    return {"content": [
        {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
         "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode())} for s, v in t.top]}
        for t in infos]}


def completion_logprobs(infos: list[TokenInfo], text_offset: int) -> dict:
    offsets, at = [], text_offset
    for t in infos:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in infos],
            "token_logprobs": [t.logprob for t in infos],
            "top_logprobs": [dict(t.top) for t in infos],
            "text_offset": offsets}


@dataclass
class Choice:
    """One choice assembled from its chunks (for non-streaming answers and usage)."""

    text: str = ""
    logprobs: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, chunk: Chunk) -> None:
        self.text += chunk.text
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)
        if chunk.prompt_tokens:
            self.prompt_tokens = chunk.prompt_tokens
            self.cached_tokens = chunk.cached_tokens
        self.completion_tokens += chunk.num_tokens   # so far; the last chunk's count wins
        if chunk.finished:
            self.finish_reason = chunk.finish_reason
            self.prompt_tokens = chunk.prompt_tokens
            self.completion_tokens = chunk.completion_tokens
            self.cached_tokens = chunk.cached_tokens


def usage(choices: list[Choice], prompts_per_choice: int = 1) -> dict:
    """Usage over all choices; a prompt shared by n choices is counted once (as OpenAI does)."""
    prompt = sum(c.prompt_tokens for c in choices[::prompts_per_choice])
    completion = sum(c.completion_tokens for c in choices)
    cached = sum(c.cached_tokens for c in choices[::prompts_per_choice])
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details={"cached_tokens": cached}).model_dump()
