"""What the engine hands back: output deltas, finish reasons, usage and timings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    """Why a request ended."""

    STOP = "stop"            # EOS, a stop token id or a stop string
    LENGTH = "length"        # max_tokens reached
    CANCELLED = "cancelled"  # the caller went away or cancelled
    ERROR = "error"          # see RequestOutput.error


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of one generated token and, if asked, its top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Timings:
    """Seconds spent in each phase of one request."""

    queued_s: float = 0.0   # submit -> admitted into the batch
    ttft_s: float = 0.0     # submit -> first token
    decode_s: float = 0.0   # first token -> finish
    total_s: float = 0.0    # submit -> finish


@dataclass(slots=True)
class RequestOutput:
    """A delta of one request's output; the last one carries finish_reason, usage and timings.
    The first one (the first token) carries the usage so far too: the prompt's size is known.

    Deltas queued for a slow reader are coalesced with ``merge``: text and tokens are
    concatenated, nothing is dropped.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_code: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: RequestOutput) -> None:
        """Append a later delta of the same request to this one."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(later.logprobs)
        if later.finished:
            self.finish_reason = later.finish_reason
            self.error, self.error_code = later.error, later.error_code
            self.usage, self.timings = later.usage, later.timings
