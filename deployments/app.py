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


# Ray runs its workers at niceness 15, below every process at the default 0 (the raylet, the
# GCS, whatever else runs on the machine). The replicas on the serving path opt out, as Ray's
# job supervisor does: an engine step is host work on one thread (on a GPU, building the
# graph and launching its kernels), and the Router relays every token; CPU contention
# stretches both. The engine's child process inherits its replica's niceness.
SERVING_ENV = {"RAY_worker_niceness": "0"}


def with_env(actor_options: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """``ray_actor_options`` with ``env`` added to its ``runtime_env.env_vars``; variables
    the options already set win."""
    runtime_env = dict(actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
    return {**actor_options, "runtime_env": runtime_env}


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
        # OpenBLAS must be preloaded when the process starts (Linux CPU backend).
        actor = with_env(options.pop("ray_actor_options", LLMServer.ray_actor_options),
                         {**SERVING_ENV, **preload_env()})
        servers[name] = LLMServer.options(
            name=server_deployment_name(name), ray_actor_options=actor,
            user_config=variant.settings.model_dump(), **options,
        ).bind(name, variant.engine.model_dump(), telemetry, variant.engine_process)
    router = dict(config.router)
    router["ray_actor_options"] = with_env(
        router.get("ray_actor_options", Router.ray_actor_options), SERVING_ENV)
    return Router.options(**router).bind(config.model_dump(), servers, telemetry, controller)
