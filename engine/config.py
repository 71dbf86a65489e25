"""Engine configuration: validated pydantic models, loaded from ``cluster.yaml`` or code."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """One model the engine serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Name clients use in the `model` field of a request.")
    path: str = Field(description="Local MLX model folder or Hugging Face repo id.")
    max_model_len: int | None = Field(
        default=None, gt=0,
        description="Context length override; defaults to the model's max_position_embeddings.",
    )
    warmup: bool = Field(default=True, description="Run a short generation at load time.")


class EngineConfig(BaseModel):
    """Settings of one engine: its models, batch shape, memory budgets and stream limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelConfig] = Field(default_factory=list, description="Models loaded at start.")
    max_batch_size: int = Field(default=32, ge=1, description="Sequences decoded together per step.")
    prefill_batch_size: int = Field(default=8, ge=1, description="Prompts prefilled together.")
    prefill_step_size: int = Field(default=2048, ge=16, description="Prompt tokens per prefill chunk.")
    prefill_wait_steps: int = Field(
        default=8, ge=0,
        description="Decode steps a new request may wait, while the batch decodes, for others "
                    "to join the batch with it (one prompt pass for the group); 0 admits each "
                    "arrival at the next step. Like TGI's --max-waiting-tokens.")
    prefill_wait_ratio: float = Field(
        default=0.25, ge=0,
        description="Waiting requests, as a share of the running ones, that join the batch "
                    "without waiting prefill_wait_steps. Like TGI's --waiting-served-ratio.")
    max_waiting_requests: int = Field(
        default=1024, ge=1, description="Requests admitted to the queue before QueueFullError.")
    max_waiting_tokens: int = Field(
        default=262144, ge=1,
        description="Prompt tokens of queued requests before QueueFullError (a request larger "
                    "than this alone is still queued when the queue is empty).")
    max_waiting_kv_fraction: float = Field(
        default=1.0, gt=0,
        description="KV memory the queued requests will need, as a fraction of the KV budget, "
                    "before QueueFullError.")
    kv_memory_bytes: int | None = Field(
        default=None, gt=0,
        description="KV-cache budget for running sequences; default kv_memory_fraction of memory.")
    kv_memory_fraction: float = Field(
        default=0.5, gt=0, le=0.95,
        description="Share of device (or system) memory for KV caches when kv_memory_bytes is unset.")
    prompt_cache_bytes: int = Field(
        default=512 * 2**20, ge=0, description="Byte budget of the prefix (prompt) cache; 0 disables it.")
    default_max_tokens: int = Field(
        default=1024, ge=1, description="max_tokens when a request sets none (capped by the context).")
    stream_buffer_tokens: int = Field(
        default=512, ge=1,
        description="Unread output tokens per request before its sequence is paused.")
    stalled_reader_timeout_s: float = Field(
        default=60.0, gt=0,
        description="A paused request whose reader has not read for this long ends with an error.")
    cudnn_attention: bool = Field(
        default=False,
        description="CUDA only: prompt passes use cuDNN's fused attention, which builds a graph "
                    "per new (batch, length) shape on the engine thread (60-130 ms on an H100). "
                    "Off: MLX's own kernels, whose first use per shape costs 5-30 ms. Per "
                    "process; MLX_CUDA_USE_CUDNN_SDPA in the environment overrides it.")
    mlx_cache_limit_bytes: int | None = Field(
        default=None, ge=0,
        description="Bytes of freed buffers MLX keeps for reuse (mx.set_cache_limit). None: "
                    "a tenth of the GPU's memory on MLX's CUDA backend, whose own bound (its "
                    "memory limit, 75 of an H100's 80 GiB) let a served 8B model's engine fill "
                    "the GPU until allocations failed; MLX's default elsewhere.")
    prompt_pad_multiple: int | None = Field(
        default=None, ge=1,
        description="Prompt passes pad their prompts to a multiple of this many tokens, so that "
                    "fewer distinct shapes reach MLX: on CUDA a prompt pass of a new (rows, "
                    "length) shape costs 5-30 ms more on first use. None: 32 with MLX's CUDA "
                    "backend, 1 (no padding) elsewhere, where padding is only extra work.")

    @model_validator(mode="after")
    def _unique_names(self):
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique, got {names}")
        return self
