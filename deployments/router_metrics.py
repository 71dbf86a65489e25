"""The Router replica's Prometheus metrics: per-variant request outcomes, latencies as its
clients see them, tokens, errors, circuit breakers and retries. Telemetry merges every
replica's registry into the application's /metrics (docs/DEPLOYMENT.md lists them)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class RouterMetrics:
    """The Router replica's own metrics (merged application-wide by Telemetry)."""

    def __init__(self, replica: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["variant", "replica"]
        self.requests = Counter("mlx_serving:requests", "Requests finished, by outcome.",
                                labels + ["endpoint", "outcome"], registry=r)
        self.ttft = Histogram("mlx_serving:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mlx_serving:inter_token_latency_seconds",
                             "Time between tokens (per chunk: gap / tokens in it).",
                             labels, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("mlx_serving:e2e_request_latency_seconds", "Request latency.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("mlx_serving:prompt_tokens", "Prompt tokens.", labels,
                                     registry=r)
        self.generation_tokens = Counter("mlx_serving:generation_tokens", "Generated tokens.",
                                         labels, registry=r)
        self.active = Gauge("mlx_serving:router_active_streams", "Streams being served.",
                            ["replica"], registry=r)
        self.errors = Counter("mlx_serving:request_errors", "Failed requests by error type.",
                              labels + ["type", "code"], registry=r)
        self.cached_tokens = Counter("mlx_serving:prompt_tokens_cached",
                                     "Prompt tokens served from the prefix cache.", labels,
                                     registry=r)
        self.circuit_state = Gauge("mlx_serving:circuit_state",
                                   "Circuit breaker per variant: 0 closed, 1 half-open, 2 open.",
                                   labels, registry=r)
        self.circuit_transitions = Counter("mlx_serving:circuit_transitions",
                                           "Circuit breaker state changes.", labels + ["to"],
                                           registry=r)
        self.retries = Counter("mlx_serving:request_retries",
                               "Requests sent again after their replica failed before the "
                               "first token.", labels, registry=r)
        self.replica = replica
