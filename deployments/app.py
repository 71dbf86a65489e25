"""The Serve application: ``cluster.yaml`` points ``import_path`` at ``build_app``."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from mlx_serving.deployments.llm_server import LLMServer
from mlx_serving.deployments.rollout_controller import RolloutController
from mlx_serving.deployments.router import Router
from mlx_serving.deployments.settings import AppConfig
from mlx_serving.deployments.telemetry import Telemetry
from mlx_serving.engine.blas import preload_env


def server_deployment_name(variant: str) -> str:
    return f"LLMServer-{variant}"


def replica_env() -> dict[str, str]:
    """Environment variables an LLMServer replica's process must start with.

    - ``RAY_worker_niceness=0``: Ray runs its workers at niceness 15, below every process
      at the default 0 (the raylet, the GCS, whatever else runs on the machine), and the
      engine's child process inherits it. A decode step of a small model on a GPU is host
      work (building the graph and launching its kernels on one thread), so CPU
      contention stretches every step. Ray's job supervisor opts out the same way; an
      ``env_vars`` entry in the variant's ``ray_actor_options.runtime_env`` overrides it.
    - OpenBLAS preloaded when the process starts (Linux CPU backend; see ``preload_env``).
    """
    return {"RAY_worker_niceness": "0", **preload_env()}


def build_app(args: dict[str, Any]) -> Application:
    """Router + one LLMServer deployment per variant + Telemetry + RolloutController."""
    config = AppConfig.model_validate(args)
    telemetry = Telemetry.bind()
    # The controller's state lives on the head node's disk: pin it there.
    controller = RolloutController.options(ray_actor_options={
        "num_cpus": 0.05, "resources": {"node:__internal_head__": 0.001}},
    ).bind(config.model_dump(), telemetry)
    servers = {}
    for name, variant in config.variants.items():
        options = dict(variant.deployment)
        actor = dict(options.pop("ray_actor_options", {"num_cpus": 0.5}))
        env = {**replica_env(), **actor.get("runtime_env", {}).get("env_vars", {})}
        actor["runtime_env"] = {**actor.get("runtime_env", {}), "env_vars": env}
        servers[name] = LLMServer.options(
            name=server_deployment_name(name), ray_actor_options=actor,
            user_config=variant.settings.model_dump(), **options,
        ).bind(name, variant.engine.model_dump(), telemetry, variant.engine_process)
    return Router.options(**config.router).bind(config.model_dump(), servers, telemetry,
                                                controller)
