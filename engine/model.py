"""A loaded model: weights, tokenizer, context length and what one token of KV costs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Mapping, TypeVar

from mlx_serving.engine import fd_limits  # noqa: F401  isort: skip  (before mlx-lm)
import mlx.core as mx
from mlx_lm import load as mlx_lm_load
from mlx_lm.utils import hf_repo_to_path, load_config, load_tokenizer
from mlx_lm.models.cache import make_prompt_cache

from mlx_serving.engine.config import ModelConfig
from mlx_serving.engine.errors import (ContextLengthExceededError, InvalidRequestError, ModelLoadError,
                                      ModelNotFoundError)
from mlx_serving.engine.params import GenerationRequest

log = logging.getLogger(__name__)

_DEFAULT_CONTEXT = 4096  # when neither the config nor the tokenizer names one


@dataclass
class ModelInfo:
    """What ``Engine.list_models`` reports about a loaded model."""

    name: str
    path: str
    context_length: int
    vocab_size: int
    kv_bytes_per_token: int
    load_seconds: float


M = TypeVar("M", bound="ModelTokenizer")


def pick_model(models: Mapping[str, M], name: str | None) -> M:
    """The model a request names (None: the only one loaded)."""
    if name is None:
        if len(models) == 1:
            return next(iter(models.values()))
        raise InvalidRequestError(f"model: name one of {sorted(models)}", param="model")
    try:
        return models[name]
    except KeyError:
        raise ModelNotFoundError(f"the model {name!r} does not exist", param="model") from None


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a Hugging Face repo id ("org/name")."""
    return path.startswith(("/", ".", "~")) or path.count("/") != 1 or Path(path).exists()


class ModelTokenizer:
    """A model's tokenizer and limits: all that encoding and checking a request needs.

    ``LoadedModel`` is one with the weights besides; a process that serves through an
    engine in another process (``EngineProcess``) holds only this part. Tokenization runs
    on the caller's thread (HF tokenizers are thread-safe).
    """

    def __init__(self, name: str, tokenizer, context_length: int, vocab_size: int):
        self.name = name
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.vocab_size = vocab_size

    @classmethod
    def load(cls, info: ModelInfo) -> ModelTokenizer:
        """The tokenizer of a model an engine has loaded (``info`` as it reports it).

        Resolved as ``mlx_lm.load`` resolves it: a local folder, else the Hugging Face
        cache entry the engine's load left behind (no download here).
        """
        try:
            path = Path(info.path).expanduser()
            if not path.exists():
                path = hf_repo_to_path(info.path)
            tokenizer = load_tokenizer(path, eos_token_ids=load_config(path).get("eos_token_id"))
        except Exception as exc:  # transformers raises many kinds; the caller needs one
            raise ModelLoadError(f"cannot load the tokenizer of {info.name!r} from "
                                 f"{info.path!r}: {exc}") from exc
        return cls(info.name, tokenizer, info.context_length, info.vocab_size)

    # -- prompts (caller thread) ---------------------------------------------------------------
    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids of the request's prompt (chat messages go through the chat template)."""
        if request.messages is not None:
            if not getattr(self.tokenizer, "has_chat_template", False):
                raise InvalidRequestError(
                    f"model {self.name!r} has no chat template; use a completions prompt",
                    param="messages")
            try:
                text = self.tokenizer.apply_chat_template(
                    request.messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # a template rejecting the messages is the caller's fault
                raise InvalidRequestError(f"messages: {exc}", param="messages") from exc
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            param = "messages"
        elif isinstance(request.prompt, str):
            ids = self.tokenizer.encode(request.prompt)
            param = "prompt"
        else:
            ids = list(request.prompt)
            param = "prompt"
            self.check_token_ids(ids, param)
        if not ids:
            raise InvalidRequestError(f"{param}: the prompt is empty", param=param)
        if len(ids) >= self.context_length:
            raise ContextLengthExceededError(
                f"{param}: the prompt has {len(ids)} tokens; this model's context is "
                f"{self.context_length} tokens", param=param)
        return ids

    def resolve_max_tokens(self, request: GenerationRequest, prompt_len: int, default: int) -> int:
        """The request's completion limit; None means ``default`` capped by the context."""
        room = self.context_length - prompt_len
        asked = request.params.max_tokens
        if asked is None:
            return min(default, room)
        if asked > room:
            raise ContextLengthExceededError(
                f"max_tokens: the prompt has {prompt_len} tokens and max_tokens is {asked}, "
                f"but this model's context is {self.context_length} tokens", param="max_tokens")
        return asked

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{param}: token ids out of range [0, {self.vocab_size}): {bad[:5]}", param=param)


class LoadedModel(ModelTokenizer):
    """An mlx-lm model and its tokenizer, ready to serve.

    Everything that touches MLX arrays runs on the engine thread.
    """

    def __init__(self, config: ModelConfig):
        self.config = config
        start = time.perf_counter()
        if _looks_local(config.path) and not Path(config.path).expanduser().is_dir():
            raise ModelLoadError(f"model {config.name!r}: no folder {config.path!r} on this node "
                                 f"(relative paths resolve against {os.getcwd()!r})")
        try:
            self.model, tokenizer, self.hf_config = mlx_lm_load(config.path, return_config=True)
        except Exception as exc:  # mlx-lm raises many kinds; the caller needs one
            raise ModelLoadError(f"cannot load model {config.name!r} from {config.path!r}: {exc}") from exc
        self.load_seconds = time.perf_counter() - start
        cfg = self.hf_config.get("text_config", self.hf_config)
        super().__init__(config.name, tokenizer,
                         context_length=config.max_model_len or _context_length(cfg, tokenizer),
                         vocab_size=int(cfg.get("vocab_size") or len(tokenizer)))
        self.eos_token_ids = tuple(sorted(tokenizer.eos_token_ids))
        self.kv_bytes_per_token = self._measure_kv_bytes_per_token()

    def info(self) -> ModelInfo:
        return ModelInfo(self.name, self.config.path, self.context_length, self.vocab_size,
                         self.kv_bytes_per_token, self.load_seconds)

    def _measure_kv_bytes_per_token(self) -> int:
        """KV bytes one token costs, from a one-token forward pass (caches grow in steps)."""
        cache = make_prompt_cache(self.model)
        self.model(mx.array([[0]]), cache=cache)
        per_token = 0
        for layer in cache:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, mx.array) and keys.ndim == 4:  # (batch, heads, capacity, dim)
                mx.eval(keys)
                per_token += layer.nbytes // keys.shape[2]
        return max(1, per_token)


def _context_length(cfg: dict, tokenizer) -> int:
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**7 else _DEFAULT_CONTEXT
