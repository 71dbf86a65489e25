"""OpenAI-compatible request and response bodies (pydantic), and their mapping to engine requests.

Requests forbid unknown fields, so a typo is a 400 naming the field rather than a silently
ignored parameter. Fields OpenAI defines that we do not implement yet are refused by name.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlx_serving.engine.errors import InvalidRequestError
from mlx_serving.engine.params import MAX_TOP_LOGPROBS, GenerationRequest, SamplingParams, build

# OpenAI fields we accept in the schema only to refuse them with a clear message.
_NOT_SUPPORTED_YET = ("response_format", "tools", "tool_choice", "functions", "function_call",
                      "parallel_tool_calls", "audio", "modalities", "prediction",
                      "web_search_options", "reasoning_effort", "service_tier", "store",
                      "metadata", "best_of", "echo", "suffix")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text; image, audio or file parts are refused by name."""
        if self.role == "tool":
            raise InvalidRequestError(f"messages[{index}].role: tool messages are not supported yet",
                                      param=f"messages[{index}].role")
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"messages[{index}].content[{j}]: content of type {kind!r} is not supported "
                    "yet (only text)", param=f"messages[{index}].content[{j}].type")
            parts.append(part["text"])
        return "".join(parts)


class _CommonRequest(_Strict):
    """Fields shared by chat and text completions (OpenAI's plus vLLM's extras)."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=16)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    # vLLM-style extras (the openai client sends them through `extra_body`)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # Quality of service (docs/GUIDES.md): the class the scheduler admits first, and a deadline
    priority: Literal["interactive", "batch"] | None = Field(
        default=None, description="Scheduling class; also the X-Priority header. Default interactive.")
    timeout_s: float | None = Field(
        default=None, gt=0, description="Deadline in seconds from arrival; also the "
                                        "X-Request-Timeout header. The request then ends with a "
                                        "deadline_exceeded error and frees its slot.")
    # Known OpenAI fields we refuse (see _NOT_SUPPORTED_YET)
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        # Raised as InvalidRequestError (not ValueError) so the field is named in the 400.
        for name in _NOT_SUPPORTED_YET:
            if getattr(self, name, None) not in (None, False):
                raise InvalidRequestError(f"{name}: not supported yet", param=name)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options: only allowed when stream is true",
                                      param="stream_options")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        if isinstance(stop, str):
            return [stop]
        return stop

    def _params(self, max_tokens: int | None, logprobs: bool, top_logprobs: int,
                choice: int) -> SamplingParams:
        fields: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "top_logprobs": top_logprobs,
            # n > 1 with a seed: choice i uses seed + i, so choices differ but stay reproducible
            "seed": None if self.seed is None else self.seed + choice,
            "top_k": None if self.top_k in (None, -1) else self.top_k,
        }
        if self.logit_bias:
            try:
                fields["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise InvalidRequestError("logit_bias: keys must be token ids",
                                          param="logit_bias") from None
        return build(SamplingParams, **{k: v for k, v in fields.items() if v is not None})


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def to_engine(self, model: str | None) -> list[GenerationRequest]:
        """One engine request per choice."""
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]
        max_tokens = self.max_completion_tokens or self.max_tokens
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs: requires logprobs to be true",
                                      param="top_logprobs")
        return [GenerationRequest(model=model, messages=messages,
                                  params=self._params(max_tokens, self.logprobs,
                                                      self.top_logprobs or 0, i))
                for i in range(self.n)]


class CompletionRequest(_CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt: must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [p]
        if all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
            return list(p)
        raise InvalidRequestError("prompt: mixes strings and token ids", param="prompt")

    def to_engine(self, model: str | None) -> list[GenerationRequest]:
        """One engine request per (prompt, choice), choice index = prompt_index * n + i."""
        want = self.logprobs is not None
        return [GenerationRequest(model=model, prompt=prompt,
                                  params=self._params(self.max_tokens if self.max_tokens else 16,
                                                      want, self.logprobs or 0, i))
                for prompt in self.prompts() for i in range(self.n)]


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# -- responses ---------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mlx-serving"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
