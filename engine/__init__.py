"""mlx_serving.engine: single-node MLX inference with continuous batching.

Knows nothing of Ray or HTTP; usable as a library.
"""

# first: mlx-lm would lower the process's file-descriptor limits on import
from mlx_serving.engine import fd_limits  # noqa: F401  isort: skip
from mlx_serving.engine.admission import AdmissionSettings
from mlx_serving.engine.config import EngineConfig, ModelConfig
from mlx_serving.engine.engine import Engine, EngineStats
from mlx_serving.engine.errors import (
    ContextLengthExceededError,
    DeadlineExceededError,
    EngineClosedError,
    EngineError,
    InvalidRequestError,
    LoadShedError,
    ModelLoadError,
    ModelNotFoundError,
    QueueFullError,
    ReaderStalledError,
)
from mlx_serving.engine.outputs import FinishReason, RequestOutput, Timings, TokenLogprob, Usage
from mlx_serving.engine.params import GenerationRequest, Priority, SamplingParams
from mlx_serving.engine.process import EngineProcess

__all__ = [
    "AdmissionSettings", "ContextLengthExceededError", "DeadlineExceededError", "Engine",
    "EngineClosedError", "EngineConfig", "EngineError", "EngineProcess", "EngineStats",
    "FinishReason", "GenerationRequest", "InvalidRequestError", "LoadShedError", "ModelConfig",
    "ModelLoadError", "ModelNotFoundError", "Priority", "QueueFullError", "ReaderStalledError",
    "RequestOutput", "SamplingParams", "Timings", "TokenLogprob", "Usage",
]
