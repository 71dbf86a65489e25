"""OpenAI-compatible request and response bodies (pydantic), and their mapping to engine requests.

Requests forbid unknown fields, so a typo is a 400 naming the field rather than a silently
ignored parameter. Fields OpenAI defines that we do not implement yet are refused by name
(and left out of the OpenAPI document). Types are strict, as JSON Schema reads them: ``"5"``
is not an integer and ``1`` is not a boolean. The models' JSON schemas are what
``deployments/openapi.py`` publishes, so every rule checked here that a schema can state is
stated in it too (``json_schema_extra`` where the check happens later, in ``to_engine`` or
the engine).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)
from pydantic.json_schema import SkipJsonSchema

from mlx_serving.engine.errors import InvalidRequestError
from mlx_serving.engine.params import (MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, GenerationRequest,
                                       SamplingParams, build)

# OpenAI fields we accept in the schema only to refuse them with a clear message.
_NOT_SUPPORTED_YET = ("response_format", "tools", "tool_choice", "functions", "function_call",
                      "parallel_tool_calls", "audio", "modalities", "prediction",
                      "web_search_options", "reasoning_effort", "service_tier", "store",
                      "metadata", "best_of", "echo", "suffix")

# Completions one request may ask for (prompts × n). Each is a call to an LLMServer replica,
# so a bigger request could exceed what a deployment ever admits at once and would be
# refused as "overloaded, retry" on an idle server.
MAX_CHOICES = 16

_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0},
              "description": "Token ids, below the model's vocabulary size."}


class TooManyChoicesError(InvalidRequestError):
    """A completions request asks for more than MAX_CHOICES completions (prompts × n)."""

    code = "too_many_choices"


def lone_surrogate_at(value: Any) -> str | None:
    """The path of the first string or key in a JSON value holding a lone surrogate (a
    ``\\ud800`` escape is valid JSON but not Unicode: it cannot be encoded, tokenized or
    echoed back). Iterative: bodies may nest as deep as the JSON parser allows."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    return path
                stack.append((f"{path}.{key}" if path else str(key), child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", child) for i, child in enumerate(item))
    return None


def _integral(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; a JSON encoder may write any integer that way."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _int(**bounds: int) -> Any:
    """An integer field type: strict (no "3", no true) but 3.0 is 3; ``bounds`` as Field's.
    (Bounds go inside the Annotated: on the field they would not reach the JSON schema.)"""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


_Int = _int()


def _union_error(value, handler, expected: str):
    """Validate a union field, reporting one error naming the field instead of one per member."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"must be {expected}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Request(_Strict):
    """A request body: its strings must be Unicode (no lone surrogates)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = lone_surrogate_at(data)
        if path is not None:
            where = path or "body"
            raise InvalidRequestError(f"{where}: contains a lone surrogate escape (such as "
                                      "\\ud800), which is not valid Unicode", param=path or None)
        return data


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        default=False, description="vLLM's extension: with include_usage, every chunk also "
                                   "carries the usage so far.")


_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        json_schema_extra={"enum": ["system", "developer", "user", "assistant"],
                           "description": "tool messages are not supported yet"})
    content: str | list[dict[str, Any]] | None = Field(
        default=None, json_schema_extra={"anyOf": [
            {"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}],
            "description": "Text, or text parts (image, audio and file parts are not "
                           "supported yet)."})
    name: str | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value, handler):
        return _union_error(value, handler, "a string, an array of content parts or null")

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


class _CommonRequest(_Request):
    """Fields shared by chat and text completions (OpenAI's plus vLLM's extras)."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = Field(
        default=None, description="Only with stream: true.")
    n: _int(ge=1, le=MAX_CHOICES) = 1
    max_tokens: _int(ge=1) | None = Field(
        default=None,
        description="Prompt tokens + max_tokens must fit the model's context (max_model_len).")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra={
        "anyOf": [{"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                   "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                  {"type": "null"}],
        "description": "Token id (a decimal string, below the vocabulary size) -> bias."})
    seed: _Int | None = None
    stop: str | list[str] | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1},
         "maxItems": MAX_STOP_STRINGS},
        {"type": "null"}]})
    user: str | None = None
    # vLLM-style extras (the openai client sends them through `extra_body`)
    top_k: _int(ge=-1) | None = Field(default=None, description="-1 or 0 disables top-k.")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stop_token_ids: list[_Int] | None = Field(default=None, json_schema_extra={
        "anyOf": [_TOKEN_IDS, {"type": "null"}]})
    ignore_eos: bool = False
    # Quality of service (docs/GUIDES.md): the class the scheduler admits first, and a deadline
    priority: Literal["interactive", "batch"] | None = Field(
        default=None, description="Scheduling class; also the X-Priority header. Default interactive.")
    timeout_s: float | None = Field(
        default=None, gt=0, description="Deadline in seconds from arrival; also the "
                                        "X-Request-Timeout header. The request then ends with a "
                                        "deadline_exceeded error and frees its slot.")
    # Known OpenAI fields we refuse (see _NOT_SUPPORTED_YET)
    response_format: SkipJsonSchema[Any] = None
    tools: SkipJsonSchema[Any] = None
    tool_choice: SkipJsonSchema[Any] = None
    functions: SkipJsonSchema[Any] = None
    function_call: SkipJsonSchema[Any] = None
    parallel_tool_calls: SkipJsonSchema[Any] = None
    audio: SkipJsonSchema[Any] = None
    modalities: SkipJsonSchema[Any] = None
    prediction: SkipJsonSchema[Any] = None
    web_search_options: SkipJsonSchema[Any] = None
    reasoning_effort: SkipJsonSchema[Any] = None
    service_tier: SkipJsonSchema[Any] = None
    store: SkipJsonSchema[Any] = None
    metadata: SkipJsonSchema[Any] = None

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

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop_list(cls, stop, handler):
        stop = _union_error(stop, handler, "a string or an array of strings")
        if isinstance(stop, str):
            return [stop]
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, bias):
        if bias and not all(k.isascii() and k.isdigit() for k in bias):
            raise InvalidRequestError("logit_bias: keys must be token ids (decimal strings)",
                                      param="logit_bias")
        return bias

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
            fields["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        return build(SamplingParams, **{k: v for k, v in fields.items() if v is not None})


# What JSON Schema states of the two field pairs that depend on each other.
_STREAM_OPTIONS_NEED_STREAM = {"anyOf": [
    {"properties": {"stream_options": {"type": "null"}}},
    {"required": ["stream"], "properties": {"stream": {"const": True}}}]}
_TOP_LOGPROBS_NEED_LOGPROBS = {"anyOf": [
    {"properties": {"top_logprobs": {"enum": [None, 0]}}},
    {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}]}


class ChatCompletionRequest(_CommonRequest):
    model_config = ConfigDict(json_schema_extra={
        "allOf": [_STREAM_OPTIONS_NEED_STREAM, _TOP_LOGPROBS_NEED_LOGPROBS]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: _int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: _int(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(
        default=None, description="Requires logprobs: true.")

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
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]})

    prompt: str | list[str] | list[_Int] | list[list[_Int]] = Field(json_schema_extra={
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES,
             "items": {"type": "string", "minLength": 1}},
            {**_TOKEN_IDS, "minItems": 1},
            {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES,
             "items": {**_TOKEN_IDS, "minItems": 1}}],
        "description": f"One prompt, or a batch; prompts × n must not exceed {MAX_CHOICES}. "
                       "Its tokens + max_tokens must fit the model's context."})
    logprobs: _int(ge=0, le=5) | None = None
    best_of: SkipJsonSchema[Any] = None
    echo: SkipJsonSchema[Any] = None
    suffix: SkipJsonSchema[Any] = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value, handler):
        return _union_error(value, handler, "a string, an array of strings, an array of "
                                            "token ids or an array of token-id arrays")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequestError("prompt: must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [p]
        return list(p)  # strict validation: all strings or all token-id lists

    def to_engine(self, model: str | None) -> list[GenerationRequest]:
        """One engine request per (prompt, choice), choice index = prompt_index * n + i."""
        prompts = self.prompts()
        if len(prompts) * self.n > MAX_CHOICES:
            raise TooManyChoicesError(
                f"prompt: {len(prompts)} prompts × n={self.n} ask for "
                f"{len(prompts) * self.n} completions; at most {MAX_CHOICES} per request",
                param="prompt")
        want = self.logprobs is not None
        return [GenerationRequest(model=model, prompt=prompt,
                                  params=self._params(self.max_tokens if self.max_tokens else 16,
                                                      want, self.logprobs or 0, i))
                for prompt in prompts for i in range(self.n)]


class TokenizeRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[_Int] = Field(json_schema_extra=_TOKEN_IDS)


# -- responses ---------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """The answer to a chat completion without ``stream`` (openai_format builds it)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    """The answer to a text completion without ``stream``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int


class DetokenizeResponse(BaseModel):
    prompt: str


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
