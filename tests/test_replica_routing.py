"""FreshQueueLengthRouter outside Serve: its settings and the view /admin/routing reports.
tests/e2e/test_replica_routing.py runs it in the Routers of a deployed application."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID

from mlx_serving.deployments.replica_routing import FreshQueueLengthRouter, routing_views


def _router(**kwargs) -> FreshQueueLengthRouter:
    router = FreshQueueLengthRouter(deployment_id=DeploymentID(name="LLMServer-unit",
                                                               app_name="unit"),
                                    handle_source=DeploymentHandleSource.UNKNOWN,
                                    use_replica_queue_len_cache=True)
    router.initialize_state(**kwargs)
    return router


def test_a_router_reports_its_view_by_deployment():
    router = _router(refresh_interval_s=0.25)
    view = routing_views()["LLMServer-unit"]
    assert view == {"refresh_interval_s": 0.25, "refreshes": 0, "missed": 0, "queue_lengths": {}}
    assert router.view() == view


def test_the_refresh_interval_must_be_positive():
    with pytest.raises(ValueError, match="refresh_interval_s"):
        _router(refresh_interval_s=0)
