"""Application-wide metrics and the admin view of active streams.

Every Router and LLMServer replica keeps its own prometheus-client registry and, once a
second, pushes it (with its list of active streams) to the single ``Telemetry`` replica.
``GET /metrics`` and ``GET /admin/streams`` read the merged view from there, so a scrape
describes the whole application, whichever Router replica answers it.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import threading
import uuid
import time
from typing import Any, Callable

from prometheus_client import (CollectorRegistry, Gauge, disable_created_metrics,
                               generate_latest)
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
        route_logs_to_serve(access_log=False)
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


class QosMetrics:
    """The QoS monitor's last report as Prometheus gauges (the controller's registry)."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["variant", "slo"]
        self.observed = Gauge("mlx_serving:slo_observed", "Observed value of each SLO's metric "
                              "over its window (seconds, or a share for error_rate).", labels,
                              registry=r)
        self.violated = Gauge("mlx_serving:slo_violated", "1 while the SLO is violated.", labels,
                              registry=r)
        self.admission = Gauge("mlx_serving:qos_admission_scale", "Scale applied to the "
                               "replicas' admission bounds.", ["variant"], registry=r)
        self.shedding = Gauge("mlx_serving:qos_shed_batch", "1 while batch-class requests are "
                              "refused.", ["variant"], registry=r)
        self.alerts = Gauge("mlx_serving:qos_alerts", "Active QoS alerts.", registry=r)

    def update(self, report) -> None:
        for gauge in (self.observed, self.violated, self.admission, self.shedding):
            gauge.clear()
        for variant, q in report.variants.items():
            observed = {"ttft_p95": q.ttft_p95_s, "itl_p95": q.itl_p95_s,
                        "error_rate": q.error_rate}
            for slo, value in observed.items():
                if value is not None:
                    self.observed.labels(variant, slo).set(value)
                self.violated.labels(variant, slo).set(
                    1.0 if slo in {v.value for v in q.violated} else 0.0)
        for variant, d in report.directives.items():
            self.admission.labels(variant).set(d.admission_scale)
            self.shedding.labels(variant).set(1.0 if d.shed_batch else 0.0)
        self.alerts.set(len(report.alerts))


def route_logs_to_serve(access_log: bool = True) -> None:
    """Send this package's log records (engine included) to the replica's Serve log file.

    Serve configures only the ``ray.serve`` logger: with ``logging_config: {encoding: JSON}``
    its handlers write one JSON object per line, with the Serve request id (the client's
    ``X-Request-ID`` or a generated one, propagated from the Router to the LLMServer through
    handle calls), deployment and replica. Records of ``mlx_serving.*`` loggers get the same
    handlers, so a request can be followed from Router to replica by that id.

    ``access_log=False`` drops Serve's line per call in this replica's process: for the
    housekeeping deployments, whose callers are the other replicas (a push a second each,
    long polls), those lines were nearly all of the logs. A failed call still logs its
    error ("Request failed.", with the traceback).
    """
    serve_logger = logging.getLogger("ray.serve")
    ours = logging.getLogger("mlx_serving")
    if not access_log:
        serve_logger.addFilter(drop_access_log)
    if not serve_logger.handlers:  # outside a Serve replica
        return
    ours.handlers = list(serve_logger.handlers)
    ours.setLevel(serve_logger.level)
    ours.propagate = False
    start_log_flusher()


LOG_FLUSH_INTERVAL_S = 1.0
_flusher_started = threading.Event()


def start_log_flusher(interval_s: float = LOG_FLUSH_INTERVAL_S) -> None:
    """Write this process's buffered Serve log records out every ``interval_s`` (once per
    process; later calls do nothing).

    Serve's throughput mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``) buffers up to 1,000
    request-path records in a ``MemoryHandler`` and writes them only when the buffer fills
    or an error is logged: a quiet replica's lines would never reach its log file, and a
    busy one's would arrive minutes late. Serve may replace its handlers (a new logging
    config), so they are looked up on every pass.
    """
    if _flusher_started.is_set():
        return
    _flusher_started.set()

    def flush_forever() -> None:
        while True:
            time.sleep(interval_s)
            for name in ("ray.serve", "mlx_serving"):
                for handler in logging.getLogger(name).handlers:
                    if isinstance(handler, logging.handlers.MemoryHandler):
                        handler.flush()

    threading.Thread(target=flush_forever, name="serve-log-flush", daemon=True).start()


def drop_access_log(record: logging.LogRecord) -> bool:
    """A logging filter: False for Serve's access-log records (one per call)."""
    return not getattr(record, "serve_access_log", False)


def replica_id() -> str:
    """This Serve replica's unique id (a local placeholder outside Serve)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
