"""Configuration of the Serve application: pydantic models of ``cluster.yaml``'s ``args``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from mlx_serving.deployments.circuit import CircuitConfig
from mlx_serving.deployments.qos import QosConfig
from mlx_serving.engine.config import EngineConfig


class FaultConfig(BaseModel):
    """Fault injection for chaos tests and drills (Envoy's fault filter is the model).

    Off by default. ``delay_ms`` is added before the first token of ``delay_percent`` of
    requests; ``abort_percent`` of requests fail with an error instead of being served, before
    their first token or, with ``abort_after_tokens``, mid-stream.
    """

    model_config = ConfigDict(extra="forbid")

    delay_ms: float = Field(default=0.0, ge=0, description="Added latency before the first token.")
    delay_percent: float = Field(default=100.0, ge=0, le=100,
                                 description="Share of requests that get the delay.")
    abort_percent: float = Field(default=0.0, ge=0, le=100,
                                 description="Share of requests failed on purpose.")
    abort_after_tokens: int = Field(
        default=0, ge=0,
        description="Tokens an aborted request streams before it fails: 0 fails it before "
                    "its first token, more fails it mid-stream (a request that ends first "
                    "is served).")


class ServerSettings(BaseModel):
    """LLMServer settings that can change live (Serve ``user_config`` → ``reconfigure``)."""

    model_config = ConfigDict(extra="forbid")

    fault: FaultConfig = Field(default_factory=FaultConfig, description="Fault injection (drills).")

    chunk_interval_ms: float = Field(
        default=10.0, ge=0,
        description="Least time between two chunks of one stream sent to the Router.")
    switch_interval_ms: float = Field(
        default=1.0, gt=0,
        description="The replica process's GIL switch interval (sys.setswitchinterval): "
                    "after each host sync the engine thread waits up to this long to take "
                    "the GIL back from Serve's threads. Python's default is 5 ms; 1 ms gave "
                    "+20% tok/s at 64 streams on an H200 (docs/BENCHMARKS.md).")
    max_chunks_per_s: float = Field(
        default=300.0, gt=0,
        description="Chunks per second one replica sends in total; with many streams each "
                    "stream's interval grows (32 streams: one chunk per ~107 ms), because every "
                    "chunk costs Serve work in the replica process that slows the engine's "
                    "steps. 300 against 1000 raised served ÷ in-process throughput by 6–14% at "
                    "32–64 streams on an H100 (docs/BENCHMARKS.md, run 7).")


class VariantConfig(BaseModel):
    """One model version served by its own LLMServer deployment."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(description="The engine of each replica: models, batch, memory.")
    engine_process: bool | None = Field(
        default=None,
        description="Run each replica's engine in a child process, so that Serve's per-chunk "
                    "work in the replica does not compete with the engine thread for the GIL. "
                    "None: a child process where MLX runs on a GPU (CUDA or Metal), whose "
                    "decode steps are short enough for that contention to cost 20-30% of "
                    "throughput; in the replica on the CPU backend, where the child's "
                    "forwarding takes CPU from the engine's BLAS threads.")
    settings: ServerSettings = Field(default_factory=ServerSettings)
    deployment: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Serve deployment options for this variant's LLMServer (num_replicas, "
                    "autoscaling_config, ray_actor_options, max_ongoing_requests, "
                    "max_queued_requests, max_replicas_per_node, ...).")

    @model_validator(mode="after")
    def _has_models(self):
        if not self.engine.models:
            raise ValueError("engine.models must name at least one model")
        return self


class CanaryConfig(BaseModel):
    """Where the rollout controller keeps its state, and the plan `canary start` uses."""

    model_config = ConfigDict(extra="forbid")

    state_dir: str = Field(default="~/.mlx-serving/canary",
                           description="Folder on the head node for the rollout state, audit "
                                       "log and flags (atomic writes).")
    plan: dict[str, Any] = Field(default_factory=dict,
                                 description="Default RolloutPlan for `canary start` (empty: "
                                             "the built-in 5% → 25% → 50% → 100% plan).")
    tick_interval_s: float = Field(default=0.5, gt=0,
                                   description="How often the controller evaluates the rollout.")


class AppConfig(BaseModel):
    """The whole application (``args`` of the application in ``cluster.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    variants: dict[str, VariantConfig] = Field(description="Model versions by name.")
    stable: str = Field(description="The variant that takes traffic by default.")
    # SecretStr: a repr or log of the config shows '**********', never a key.
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Bearer tokens clients must send; empty = no auth. Also read from the "
                    "MLX_SERVING_API_KEYS environment variable (comma-separated).")
    operator_token: SecretStr | None = Field(
        default=None,
        description="Token for /admin/* (also MLX_SERVING_OPERATOR_TOKEN); unset = admin off.")
    max_body_bytes: int = Field(default=4 * 2**20, gt=0, description="Largest request body.")
    router: dict[str, Any] = Field(
        default_factory=dict, description="Ray Serve deployment options for the Router.")
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    circuit_breaker: CircuitConfig = Field(
        default_factory=CircuitConfig,
        description="Per-variant circuit breaker in each Router replica (docs/RELIABILITY.md).")
    qos: QosConfig = Field(
        default_factory=QosConfig,
        description="SLOs over sliding windows and the actions their violations trigger.")

    @model_validator(mode="after")
    def _stable_exists(self):
        if self.stable not in self.variants:
            raise ValueError(f"stable variant {self.stable!r} is not among {sorted(self.variants)}")
        return self
