"""Configuration of the Serve application: pydantic models of ``cluster.yaml``'s ``args``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlx_serving.engine.config import EngineConfig


class ServerSettings(BaseModel):
    """LLMServer settings that can change live (Serve ``user_config`` → ``reconfigure``)."""

    model_config = ConfigDict(extra="forbid")

    chunk_interval_ms: float = Field(
        default=10.0, ge=0,
        description="Least time between two chunks of one stream sent to the Router.")
    max_chunks_per_s: float = Field(
        default=1000.0, gt=0,
        description="Chunks per second one replica sends in total; with many streams each "
                    "stream's interval grows so Ray's streaming path is not saturated.")


class VariantConfig(BaseModel):
    """One model version served by its own LLMServer deployment."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineConfig = Field(description="The engine of each replica: models, batch, memory.")
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


class AppConfig(BaseModel):
    """The whole application (``args`` of the application in ``cluster.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    variants: dict[str, VariantConfig] = Field(description="Model versions by name.")
    stable: str = Field(description="The variant that takes traffic by default.")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Bearer tokens clients must send; empty = no auth. Also read from the "
                    "MLX_SERVING_API_KEYS environment variable (comma-separated).")
    operator_token: str | None = Field(
        default=None,
        description="Token for /admin/* (also MLX_SERVING_OPERATOR_TOKEN); unset = admin off.")
    max_body_bytes: int = Field(default=4 * 2**20, gt=0, description="Largest request body.")
    router: dict[str, Any] = Field(
        default_factory=dict, description="Ray Serve deployment options for the Router.")

    @model_validator(mode="after")
    def _stable_exists(self):
        if self.stable not in self.variants:
            raise ValueError(f"stable variant {self.stable!r} is not among {sorted(self.variants)}")
        return self
