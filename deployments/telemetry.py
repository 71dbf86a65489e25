"""Application-wide metrics and the admin view of active streams.

Every Router and LLMServer replica keeps its own prometheus-client registry and, once a
second, pushes it (with its list of active streams) to the single ``Telemetry`` replica.
``GET /metrics`` and ``GET /admin/streams`` read the merged view from there, so a scrape
describes the whole application, whichever Router replica answers it.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

log = logging.getLogger(__name__)

PUSH_INTERVAL_S = 1.0

disable_created_metrics()  # `_created` series only add noise to every scrape
STALE_AFTER_S = 10.0


@serve.deployment(name="Telemetry", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0.05})
class Telemetry:
    """Collects metric snapshots and active-stream lists from every replica."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S):
        self._stale_after_s = stale_after_s
        self._sources: dict[str, tuple[float, str, list[dict]]] = {}

    def push(self, source: str, metrics_text: str, streams: list[dict]) -> None:
        self._sources[source] = (time.monotonic(), metrics_text, streams)

    def _fresh(self):
        cutoff = time.monotonic() - self._stale_after_s
        for source, (at, _, _) in list(self._sources.items()):
            if at < cutoff:  # that replica is gone
                del self._sources[source]
        return self._sources.values()

    def metrics_text(self) -> str:
        return merge_exposition([text for _, text, _ in self._fresh()])

    def streams(self) -> list[dict]:
        return sorted((s for _, _, streams in self._fresh() for s in streams),
                      key=lambda s: -s.get("age_s", 0))


class _Merged:
    """A prometheus-client collector over families parsed from several replicas' text."""

    def __init__(self, texts: list[str]):
        self._texts = texts

    def collect(self):
        families: dict[str, Any] = {}
        for text in self._texts:
            for family in text_string_to_metric_families(text):
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        return list(families.values())


def merge_exposition(texts: list[str]) -> str:
    """Merge Prometheus text expositions whose samples differ by labels into one."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(texts))
    return generate_latest(registry).decode()


class Reporter:
    """Pushes one replica's registry and active streams to ``Telemetry`` every second.

    Runs on its own daemon thread, so a slow or restarting Telemetry replica never blocks
    request handling; a failed push is retried on the next tick.
    """

    def __init__(self, telemetry, source: str, registry: CollectorRegistry,
                 streams: Callable[[], list[dict]] = lambda: []):
        self._telemetry = telemetry
        self._source = source
        self._registry = registry
        self._streams = streams
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="telemetry-reporter", daemon=True)

    def start(self) -> "Reporter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(PUSH_INTERVAL_S):
            try:
                text = generate_latest(self._registry).decode()
                self._telemetry.push.remote(self._source, text, self._streams()).result(
                    timeout_s=5)
            except Exception as exc:  # Telemetry restarting: keep serving, retry next tick
                log.debug("telemetry push failed: %r", exc)


def replica_id() -> str:
    """This Serve replica's unique id (a local placeholder outside Serve)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
