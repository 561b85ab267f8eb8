"""The Prometheus series of `ds serve` (names from `fullchain.metric_names`, base units).

Each app gets its own `CollectorRegistry`, so several servers (or tests) in one process never collide.

A server that splits traffic between two models (live A/B) labels every per-request and per-batch series with
``variant`` ("a" or "b"), so a dashboard or `ds-monitor` reads each model's latency, errors and batching apart,
and summing over the label still gives the server's totals. A server with one model writes the same series
without the label. The in-flight gauge counts the whole server either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fullchain import metric_names as names

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
VARIANT = "variant"


@dataclass
class VariantMetrics:
    """The series one served model writes: its labelled children in an A/B split, the plain series otherwise."""

    request_seconds: Any
    queue_wait_seconds: Any
    inference_seconds: Any
    batch_size: Any
    queue_depth: Any
    requests: Counter
    labels: dict[str, str] = field(default_factory=dict)

    def count(self, status: str) -> None:
        self.requests.labels(status=status, **self.labels).inc()


class ServeMetrics:
    def __init__(self, variants: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self.variants = tuple(variants)
        r, by = self.registry, [VARIANT] if variants else []
        self.request_seconds = Histogram(names.SERVE_REQUEST_SECONDS, "POST /v1/predict: arrival to response", by,
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram(names.SERVE_QUEUE_WAIT_SECONDS, "arrival to the start of its batch", by,
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram(names.SERVE_INFERENCE_SECONDS, "one batch's forward pass", by,
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(names.SERVE_BATCH_SIZE, "requests per batch", by, buckets=BATCH_BUCKETS,
                                    registry=r)
        self.requests = Counter(names.SERVE_REQUESTS_TOTAL.removesuffix("_total"), "POST /v1/predict by HTTP status",
                                ["status", *by], registry=r)
        self.in_flight = Gauge(names.SERVE_IN_FLIGHT, "requests accepted and not yet answered", registry=r)
        self.queue_depth = Gauge(names.SERVE_QUEUE_DEPTH, "requests waiting for a batch", by, registry=r)
        self._of = {v: self._children(v) for v in self.variants}  # exposed at 0 from the start
        self._plain = self._children(None)

    def of(self, variant: str) -> VariantMetrics:
        """The series of `variant` (in a server without a split: the plain series, whatever the name)."""
        return self._of[variant] if self.variants else self._plain

    def _children(self, variant: str | None) -> VariantMetrics:
        labels = {VARIANT: variant} if variant is not None else {}

        def child(metric):
            return metric.labels(**labels) if labels else metric

        return VariantMetrics(child(self.request_seconds), child(self.queue_wait_seconds),
                              child(self.inference_seconds), child(self.batch_size), child(self.queue_depth),
                              self.requests, labels)
