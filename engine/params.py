"""What a caller asks of the engine: sampling parameters and the generation request."""

from __future__ import annotations

import enum
import uuid
from typing import Any

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from mlx_serving.engine.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


class Priority(str, enum.Enum):
    """A request's scheduling class: interactive work is admitted first and may preempt batch."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class SamplingParams(BaseModel):
    """Per-request decoding parameters (OpenAI names and defaults, plus vLLM's extras)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(default=None, ge=1, description="Completion length limit.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k.")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="1.0 disables it.")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    penalty_context_size: int = Field(
        default=64, ge=1, description="How many recent tokens the penalties look at.")
    logit_bias: dict[int, float] | None = Field(default=None, description="Token id -> additive bias.")
    seed: int | None = Field(default=None, description="Makes sampling reproducible.")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = Field(default=False, description="Keep going past EOS (benchmarks).")
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[int, float] | None):
        if bias and any(not -100.0 <= v <= 100.0 for v in bias.values()):
            raise ValueError("logit_bias values must lie in [-100, 100]")
        return bias

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int, info: ValidationInfo) -> int:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs")
        return top

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0 or bool(self.logit_bias))


class GenerationRequest(BaseModel):
    """One request: exactly one of ``prompt`` (text or token ids) or chat ``messages``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    model: str | None = Field(default=None, description="Served model name; None = the only one.")
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    params: SamplingParams = Field(default_factory=SamplingParams)
    priority: Priority = Field(
        default=Priority.INTERACTIVE,
        description="Scheduling class: interactive is admitted first and may preempt batch.")
    timeout_s: float | None = Field(
        default=None, gt=0,
        description="Deadline in seconds from submission; past it the request ends with a "
                    "deadline_exceeded error wherever it is.")
    deadline_at: float | None = Field(
        default=None,
        description="The same deadline as a wall-clock time (seconds since the epoch), set "
                    "where the request first arrived (the Router), so that the time spent "
                    "before it reached this engine counts too; the earlier of the two holds.")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise ValueError("messages must not be empty")
        return self


def build(model_cls, /, **fields):
    """Construct a pydantic model, turning validation errors into ``InvalidRequestError``.

    The error's ``param`` is the dotted path of the first offending field, so the HTTP
    layer can name it.
    """
    try:
        return model_cls(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequestError(f"{param or 'request'}: {first['msg']}", param=param) from None
