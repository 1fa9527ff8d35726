"""Prometheus metrics of the server, in a registry of their own (one per engine, so several engines in
one process, e.g. in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    """Counters, gauges and histograms of the engine and the HTTP layer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("metal_marlin_requests", "HTTP API requests by response status code", ["status"],
                                registry=r)
        self.queue_depth = Gauge("metal_marlin_queue_depth", "requests waiting for admission", registry=r)
        self.running = Gauge("metal_marlin_running_requests", "requests in the running batch", registry=r)
        self.time_to_first_token = Histogram("metal_marlin_time_to_first_token_seconds",
                                             "from submission to the first generated token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("metal_marlin_inter_token_latency_seconds",
                                             "between consecutive tokens of a request", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.generated_tokens = Counter("metal_marlin_generated_tokens", "tokens generated", registry=r)
        self.kv_blocks_used = Gauge("metal_marlin_kv_blocks_used", "paged KV cache blocks held by requests",
                                    registry=r)
        self.kv_blocks_total = Gauge("metal_marlin_kv_blocks_total", "paged KV cache blocks requests can hold",
                                     registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
