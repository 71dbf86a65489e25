"""The GPU canary drill's pure parts: its application config and the per-variant summary."""

from __future__ import annotations

from mlx_serving.bench.canary_gpus import by_variant, drill_config
from mlx_serving.deployments.settings import AppConfig


def test_stable_and_canary_each_on_their_own_gpus_and_the_canary_slower(tmp_path):
    config = drill_config(str(tmp_path), stable_replicas=2, canary_replicas=1, gpus=1.0,
                          delay_ms=150.0, max_batch_size=64, state_dir=str(tmp_path / "state"))
    args = config["applications"][0]["args"]
    app = AppConfig.model_validate(args)          # what the application itself will accept
    stable, canary = app.variants["stable"], app.variants["canary"]
    assert stable.deployment["num_replicas"] == 2 and canary.deployment["num_replicas"] == 1
    assert stable.deployment["ray_actor_options"]["num_gpus"] == 1.0
    assert canary.deployment["ray_actor_options"]["num_gpus"] == 1.0
    assert (canary.settings.fault.delay_ms, canary.settings.fault.delay_percent) == (150.0, 100)
    assert stable.settings.fault.delay_ms == 0
    assert stable.engine.models == canary.engine.models    # the same model, only slower
    assert not app.qos.enabled      # the rollback must be the rollout's own decision
    assert app.operator_token is not None


def test_results_are_summarised_per_variant():
    results = [
        {"variant": "stable", "status": 200, "ttft_s": 0.10, "tokens": 64},
        {"variant": "stable", "status": 200, "ttft_s": 0.12, "tokens": 64},
        {"variant": "canary", "status": 200, "ttft_s": 0.30, "tokens": 64},
        {"variant": "canary", "status": "error_event", "ttft_s": None, "tokens": 3},
        {"variant": None, "status": "ConnectError", "ttft_s": None, "tokens": 0},
    ]
    summary = by_variant(results)
    assert summary["stable"]["requests"] == 2 and summary["stable"]["tokens"] == 128
    assert summary["canary"]["outcomes"] == {"200": 1, "error_event": 1}
    assert summary["canary"]["ttft_ms"]["p50"] == 300.0
    assert summary["none"]["outcomes"] == {"ConnectError": 1}
