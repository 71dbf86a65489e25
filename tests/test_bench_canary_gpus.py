"""The GPU canary drill's pure parts: its application config, the per-variant summary and
hearing from every replica."""

from __future__ import annotations

from mlx_serving.bench.canary_gpus import by_variant, drill_config, heard_from
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


def _answers(*replicas: str) -> list[dict]:
    return [{"replica": r, "pid": 100, "gpu_ids": [r], "models": ["m"]} for r in replicas]


def test_every_replica_is_heard_from_though_the_calls_keep_landing_on_one():
    # run 23: the replica list named one of each variant's two replicas, every call having
    # landed on the same one
    rounds = iter([_answers("a", "a", "a", "a"), _answers("a", "a", "a", "a"),
                   _answers("a", "b", "a", "a")])
    asked = []

    def ask(calls: int) -> list[dict]:
        asked.append(calls)
        return next(rounds)

    heard = heard_from(ask, 2, timeout_s=30)
    assert heard == [{"replica": "a", "pid": 100, "gpu_ids": ["a"]},
                     {"replica": "b", "pid": 100, "gpu_ids": ["b"]}]
    assert asked == [4, 4, 4]       # rounds of concurrent calls until both answered


def test_asking_ends_at_the_timeout_and_says_who_was_missing(capsys):
    heard = heard_from(lambda calls: _answers(*["a"] * calls), 2, timeout_s=0.5)
    assert [r["replica"] for r in heard] == ["a"]
    assert "heard from 1 of 2 replicas" in capsys.readouterr().err
