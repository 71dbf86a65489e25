"""mlx_serving.engine: single-node MLX inference with continuous batching.

Knows nothing of Ray or HTTP; usable as a library.
"""

from mlx_serving.engine.config import EngineConfig, ModelConfig
from mlx_serving.engine.engine import Engine, EngineStats
from mlx_serving.engine.errors import (
    ContextLengthExceededError,
    EngineClosedError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    QueueFullError,
    ReaderStalledError,
)
from mlx_serving.engine.outputs import FinishReason, RequestOutput, Timings, TokenLogprob, Usage
from mlx_serving.engine.params import GenerationRequest, SamplingParams
from mlx_serving.engine.process import EngineProcess

__all__ = [
    "ContextLengthExceededError", "Engine", "EngineClosedError", "EngineConfig", "EngineError",
    "EngineProcess", "EngineStats", "FinishReason", "GenerationRequest", "InvalidRequestError",
    "ModelConfig", "ModelLoadError", "ModelNotFoundError", "QueueFullError", "ReaderStalledError",
    "RequestOutput", "SamplingParams", "Timings", "TokenLogprob", "Usage",
]
