"""mlx_serving.engine: single-node MLX inference with continuous batching.

Knows nothing of Ray or HTTP; usable as a library.

The names below load their modules on first use, so that what needs only the engine's
plain types (its errors, request parameters and config, as the Router, the rollout
controller and the app builder do) imports neither MLX nor mlx-lm: mlx-lm brings in
transformers, and with it torch where the Python has torch, about 15 s of CPU per process.
Every module that imports mlx-lm imports ``fd_limits`` first (mlx-lm would lower the
process's file-descriptor limits on import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlx_serving.engine.admission import AdmissionSettings
    from mlx_serving.engine.config import EngineConfig, ModelConfig
    from mlx_serving.engine.engine import Engine, EngineStats
    from mlx_serving.engine.errors import (ContextLengthExceededError, DeadlineExceededError,
                                           EngineClosedError, EngineError,
                                           InvalidRequestError, LoadShedError, ModelLoadError,
                                           ModelNotFoundError, QueueFullError,
                                           ReaderStalledError)
    from mlx_serving.engine.outputs import (FinishReason, RequestOutput, Timings,
                                            TokenLogprob, Usage)
    from mlx_serving.engine.params import GenerationRequest, Priority, SamplingParams
    from mlx_serving.engine.process import EngineProcess

_HOMES = {
    "admission": ["AdmissionSettings"],
    "config": ["EngineConfig", "ModelConfig"],
    "engine": ["Engine", "EngineStats"],
    "errors": ["ContextLengthExceededError", "DeadlineExceededError", "EngineClosedError",
               "EngineError", "InvalidRequestError", "LoadShedError", "ModelLoadError",
               "ModelNotFoundError", "QueueFullError", "ReaderStalledError"],
    "outputs": ["FinishReason", "RequestOutput", "Timings", "TokenLogprob", "Usage"],
    "params": ["GenerationRequest", "Priority", "SamplingParams"],
    "process": ["EngineProcess"],
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
