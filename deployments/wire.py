"""What crosses the Ray boundary between an LLMServer replica and the Router.

Tokens travel in coalesced chunks (several tokens per item), never one remote item per
token: a Ray streaming call carries a few thousand items per second in total.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenInfo:
    """One generated token for ``logprobs``: its text, log-probability and top alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class Chunk:
    """Output of one request since the previous chunk; the last one has ``finish_reason``."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenInfo] | None = None
    finish_reason: str | None = None     # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    error_code: str | None = None
    prompt_tokens: int = 0               # on the first chunk with tokens and the last
    completion_tokens: int = 0           # with finish_reason: of the whole request
    cached_tokens: int = 0               # as prompt_tokens
    replica: str | None = None           # set on the first chunk: which replica serves it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
