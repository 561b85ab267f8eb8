"""From snapshots to figures: histogram quantiles, counter rates, rolling windows and the named views.

A *view* is one derived figure the user can watch (``latency_p95``, ``throughput_rps``, ``data_share``...),
computed between two snapshots; `--metrics` picks views by group. `observation_facts` condenses a whole
observation into the plain numbers the bottleneck rules read.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fullchain import metric_names as M
from fullchain.monitor.scrape import Snapshot

Buckets = list[tuple[float, float]]  # (upper bound, cumulative count), sorted by bound


def buckets(snap: Snapshot | None, name: str) -> Buckets:
    """The cumulative buckets of histogram `name`, summed over any labels other than ``le``."""
    if snap is None:
        return []
    totals: dict[float, float] = {}
    for key, value in snap.with_prefix(name + "_bucket").items():
        le = key.split('le="', 1)[1].split('"', 1)[0]
        bound = math.inf if le in ("+Inf", "inf") else float(le)
        totals[bound] = totals.get(bound, 0.0) + value
    return sorted(totals.items())


def total(snap: Snapshot | None, name: str) -> float:
    """Sum of every sample of `name` (all label sets); 0 for no snapshot, NaN when the series is absent."""
    if snap is None:
        return 0.0
    samples = snap.with_prefix(name)
    return sum(samples.values()) if samples else math.nan


def counted(snap: Snapshot | None, name: str) -> float:
    """Like `total`, but a series not (yet) exposed counts as 0: the start value of a counter."""
    value = total(snap, name)
    return 0.0 if math.isnan(value) else value


@dataclass
class HistogramDelta:
    buckets: Buckets
    count: float
    sum: float

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count > 0 else math.nan

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket holding rank q*count, as Prometheus' histogram_quantile."""
        if self.count <= 0 or not self.buckets:
            return math.nan
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for bound, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(bound):
                    return lower_bound  # above the highest finite bucket: its bound is all we know
                span = cumulative - lower_count
                return lower_bound + (bound - lower_bound) * ((rank - lower_count) / span if span else 1.0)
            lower_bound, lower_count = bound, cumulative
        return lower_bound


def histogram_delta(before: Snapshot | None, after: Snapshot, name: str) -> HistogramDelta:
    """What histogram `name` recorded between two snapshots (since its start when `before` is None)."""
    old = dict(buckets(before, name))
    new = buckets(after, name)
    delta = [(bound, count - old.get(bound, 0.0)) for bound, count in new]
    count = counted(after, name + "_count") - counted(before, name + "_count")
    return HistogramDelta(delta, count, counted(after, name + "_sum") - counted(before, name + "_sum"))


def rate(before: Snapshot, after: Snapshot, name: str) -> float:
    dt = after.t - before.t
    return (total(after, name) - total(before, name)) / dt if dt > 0 else math.nan


def error_share(before: Snapshot | None, after: Snapshot) -> float:
    """Share of answered requests whose status is not 2xx."""
    old = before.with_prefix(M.SERVE_REQUESTS_TOTAL) if before else {}
    answered = failed = 0.0
    for key, value in after.with_prefix(M.SERVE_REQUESTS_TOTAL).items():
        n = value - old.get(key, 0.0)
        answered += n
        if 'status="2' not in key:
            failed += n
    return failed / answered if answered > 0 else math.nan


def share(before: Snapshot | None, after: Snapshot, part: str, whole_histogram: str) -> float:
    """Δpart / Δ(sum of the histogram), e.g. data-wait seconds per second of training step."""
    whole = histogram_delta(before, after, whole_histogram).sum
    if not (after.with_prefix(part) or after.with_prefix(part + "_sum")):
        return math.nan
    part_value = histogram_delta(before, after, part).sum if after.with_prefix(part + "_sum") else \
        counted(after, part) - counted(before, part)
    return part_value / whole if whole > 0 else math.nan


@dataclass(frozen=True)
class View:
    key: str
    group: str
    label: str
    unit: str
    compute: Callable[[Snapshot, Snapshot], float]


def _q(name: str, q: float) -> Callable[[Snapshot, Snapshot], float]:
    return lambda a, b: histogram_delta(a, b, name).quantile(q)


def _mean(name: str) -> Callable[[Snapshot, Snapshot], float]:
    return lambda a, b: histogram_delta(a, b, name).mean


def _gauge(name: str) -> Callable[[Snapshot, Snapshot], float]:
    return lambda a, b: total(b, name)


VIEWS: tuple[View, ...] = (
    View("latency_p50", "latency", "request latency p50", "s", _q(M.SERVE_REQUEST_SECONDS, 0.50)),
    View("latency_p95", "latency", "request latency p95", "s", _q(M.SERVE_REQUEST_SECONDS, 0.95)),
    View("latency_p99", "latency", "request latency p99", "s", _q(M.SERVE_REQUEST_SECONDS, 0.99)),
    View("throughput_rps", "throughput", "requests answered", "req/s", lambda a, b: rate(a, b, M.SERVE_REQUESTS_TOTAL)),
    View("throughput_samples", "throughput", "training samples", "samples/s",
         lambda a, b: rate(a, b, M.TRAIN_SAMPLES_TOTAL)),
    View("queue_wait_p95", "queue", "queue wait p95", "s", _q(M.SERVE_QUEUE_WAIT_SECONDS, 0.95)),
    View("queue_depth", "queue", "queue depth", "requests", _gauge(M.SERVE_QUEUE_DEPTH)),
    View("batch_mean", "batch", "mean batch size", "requests", _mean(M.SERVE_BATCH_SIZE)),
    View("inference_mean", "batch", "batch inference time", "s", _mean(M.SERVE_INFERENCE_SECONDS)),
    View("error_share", "errors", "non-2xx share", "", error_share),
    View("train_loss", "loss", "training loss", "", _gauge(M.TRAIN_LOSS)),
    View("step_p50", "step_time", "step time p50", "s", _q(M.TRAIN_STEP_SECONDS, 0.50)),
    View("step_p95", "step_time", "step time p95", "s", _q(M.TRAIN_STEP_SECONDS, 0.95)),
    View("data_share", "data_time", "data wait / step time", "",
         lambda a, b: share(a, b, M.DATA_WAIT_SECONDS, M.TRAIN_STEP_SECONDS)),
    View("comm_share", "comm", "communication / step time", "",
         lambda a, b: share(a, b, M.COMM_SECONDS_TOTAL, M.TRAIN_STEP_SECONDS)),
)
GROUPS = tuple(dict.fromkeys(v.group for v in VIEWS))


def views_for(groups: list[str]) -> list[View]:
    return [v for v in VIEWS if v.group in groups]


class Recorder:
    """Every snapshot of an observation, and each view as a time series over a rolling window."""

    def __init__(self, views: list[View], window_s: float = 10.0):
        self.views = views
        self.window_s = window_s
        self.snapshots: list[Snapshot] = []
        self.points: dict[str, list[tuple[float, float]]] = {v.key: [] for v in views}

    def add(self, snap: Snapshot) -> None:
        self.snapshots.append(snap)
        if len(self.snapshots) < 2:
            return
        start = next(s for s in self.snapshots if s.t >= snap.t - self.window_s - 1e-9)
        if start is snap:
            start = self.snapshots[-2]
        for view in self.views:
            value = view.compute(start, snap)
            if not math.isnan(value):
                self.points[view.key].append((snap.t, value))

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.points[key]]

    def latest(self, key: str) -> float:
        points = self.points[key]
        return points[-1][1] if points else math.nan


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _mean_of(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def observation_facts(snapshots: list[Snapshot]) -> dict[str, Any]:
    """Plain numbers over a whole observation (first to last snapshot) for the rules; absent series give NaN."""
    if not snapshots:
        return {}
    first, last = (snapshots[0], snapshots[-1]) if len(snapshots) > 1 else (None, snapshots[-1])
    request = histogram_delta(first, last, M.SERVE_REQUEST_SECONDS)
    queue = histogram_delta(first, last, M.SERVE_QUEUE_WAIT_SECONDS)
    inference = histogram_delta(first, last, M.SERVE_INFERENCE_SECONDS)
    batch = histogram_delta(first, last, M.SERVE_BATCH_SIZE)
    step = histogram_delta(first, last, M.TRAIN_STEP_SECONDS)
    facts: dict[str, Any] = {
        "requests": request.count,
        "request_mean_s": request.mean,
        "request_p95_s": request.quantile(0.95),
        "queue_wait_mean_s": queue.mean,
        "inference_mean_s": inference.mean,
        "queue_share": queue.mean / request.mean if request.count else math.nan,
        "inference_share": inference.mean / request.mean if request.count and inference.count else math.nan,
        "batch_mean": batch.mean,
        "in_flight_peak": max(_finite([total(s, M.SERVE_IN_FLIGHT) for s in snapshots]), default=math.nan),
        "queue_depth_peak": max(_finite([total(s, M.SERVE_QUEUE_DEPTH) for s in snapshots]), default=math.nan),
        "queue_depth_mean": _mean_of(_finite([total(s, M.SERVE_QUEUE_DEPTH) for s in snapshots])),
        "error_share": error_share(first, last),
        "steps": step.count,
        "step_mean_s": step.mean,
        "data_share": share(first, last, M.DATA_WAIT_SECONDS, M.TRAIN_STEP_SECONDS),
        "comm_share": share(first, last, M.COMM_SECONDS_TOTAL, M.TRAIN_STEP_SECONDS),
        "checkpoint_share": share(first, last, M.CHECKPOINT_BLOCKED_SECONDS, M.TRAIN_STEP_SECONDS),
        "skipped_steps": counted(last, M.AMP_SKIPPED_STEPS_TOTAL) - counted(first, M.AMP_SKIPPED_STEPS_TOTAL),
        "loss": [total(s, M.TRAIN_LOSS) for s in snapshots if s.with_prefix(M.TRAIN_LOSS)],
        "samples_per_s": _finite([total(s, M.TRAIN_SAMPLES_PER_SECOND) for s in snapshots
                                  if s.with_prefix(M.TRAIN_SAMPLES_PER_SECOND)]),
    }
    return facts


def rolling_percentiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p95, p99 of a list of view values (for views that are not histograms themselves)."""
    values = _finite(values)
    if not values:
        return (math.nan,) * 3
    if len(values) == 1:
        return (values[0],) * 3
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[94], cuts[98]
