"""The Prometheus series of `ds serve` (names from `fullchain.metric_names`, base units).

Each app gets its own `CollectorRegistry`, so several servers (or tests) in one process never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fullchain import metric_names as names

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(names.SERVE_REQUEST_SECONDS, "POST /v1/predict: arrival to response",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram(names.SERVE_QUEUE_WAIT_SECONDS, "arrival to the start of its batch",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram(names.SERVE_INFERENCE_SECONDS, "one batch's forward pass",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(names.SERVE_BATCH_SIZE, "requests per batch", buckets=BATCH_BUCKETS, registry=r)
        self.requests = Counter(names.SERVE_REQUESTS_TOTAL.removesuffix("_total"), "POST /v1/predict by HTTP status",
                                ["status"], registry=r)
        self.in_flight = Gauge(names.SERVE_IN_FLIGHT, "requests accepted and not yet answered", registry=r)
        self.queue_depth = Gauge(names.SERVE_QUEUE_DEPTH, "requests waiting for a batch", registry=r)
