"""Bottleneck diagnosis: rules over observed facts, every threshold in `THRESHOLDS`, findings ranked by impact.

The facts are plain numbers (see `fullchain.monitor.series.observation_facts`); the live monitor, the
profiler and the log analyser each produce them from their own source, so one set of rules serves all
three. A `Finding` quotes its evidence (metric, value, threshold) and one concrete action: a config key
with a value, or a command. `impact` estimates the share of latency or step time the action can win back
(1.0 for a run that is producing nothing useful), and findings are sorted by it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# Every threshold the rules use, with what it means; the report quotes this table.
THRESHOLDS: dict[str, tuple[float, str]] = {
    "min_requests": (20, "requests observed before serving rules judge anything"),
    "queue_share": (0.5, "queue wait / request latency above this: requests wait more than they compute"),
    "batch_one_mean": (1.5, "mean batch size at or below this counts as unbatched"),
    "busy_in_flight": (2, "peak in-flight requests at least this: there was load to batch"),
    "inference_share": (0.6, "batch inference / request latency above this: the model itself is the cost"),
    "error_share": (0.01, "share of non-2xx answers above this"),
    "min_steps": (5, "training steps observed before training rules judge anything"),
    "data_share": (0.2, "data wait / step time above this: the input pipeline starves the model"),
    "comm_share": (0.3, "gradient communication / step time above this"),
    "checkpoint_share": (0.1, "time save() blocks training / step time above this"),
    "skipped_share": (0.05, "share of steps skipped by loss scaling above this"),
    "throughput_drop": (0.75, "late throughput below this fraction of the post-warm-up median"),
    "warmup_fraction": (0.2, "leading share of throughput points ignored as warm-up"),
    "loss_spike_factor": (3.0, "a loss above this multiple of the running median is a spike"),
    "straggler_ratio": (0.75, "a rank's balanced share of the batch below this fraction of the largest share"),
}


def threshold(name: str) -> float:
    return THRESHOLDS[name][0]


@dataclass
class Evidence:
    metric: str
    value: float
    threshold: float
    comparison: str  # ">", "<", ">=", "<=", "=="

    def text(self) -> str:
        return f"{self.metric} = {_fmt(self.value)} ({self.comparison} {_fmt(self.threshold)})"


@dataclass
class Finding:
    rule: str
    title: str
    impact: float
    evidence: list[Evidence]
    action: str
    settings: dict[str, Any] = field(default_factory=dict)  # config key -> suggested value
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: float) -> str:
    if isinstance(value, float) and (value != value or abs(value) >= 1e4 or (0 < abs(value) < 1e-2)):
        return f"{value:.3g}"
    return f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def _num(facts: dict[str, Any], key: str) -> float:
    value = facts.get(key, math.nan)
    return float(value) if value is not None else math.nan


def _serving(facts: dict[str, Any]) -> bool:
    return _num(facts, "requests") >= threshold("min_requests")


def _training(facts: dict[str, Any]) -> bool:
    return _num(facts, "steps") >= threshold("min_steps")


def suggested_batch(facts: dict[str, Any]) -> int:
    """A max batch size that covers the observed concurrency: the next power of two, 8 to 64."""
    peak = _num(facts, "in_flight_peak")
    peak = peak if math.isfinite(peak) else 32
    return int(min(64, max(8, 2 ** math.ceil(math.log2(max(peak, 1))))))


def queue_bound(facts: dict[str, Any]) -> Finding | None:
    qs = _num(facts, "queue_share")
    if not (_serving(facts) and qs > threshold("queue_share")):
        return None
    evidence = [Evidence("serve_queue_wait_seconds mean / serve_request_duration_seconds mean", qs,
                         threshold("queue_share"), ">")]
    batch = _num(facts, "batch_mean")
    if batch <= threshold("batch_one_mean"):
        size = suggested_batch(facts)
        evidence.append(Evidence("serve_batch_size mean", batch, threshold("batch_one_mean"), "<="))
        return Finding(
            "serve_queue", "Requests wait in the queue, and batches hold one request", qs, evidence,
            f"batch concurrent requests: set serve.max_batch_size to {size} (ds serve --max-batch-size {size}); "
            "queued requests then share one forward pass",
            settings={"serve.max_batch_size": size}, command=f"ds serve MODEL_DIR --max-batch-size {size}")
    evidence.append(Evidence("serve_batch_size mean", batch, threshold("batch_one_mean"), ">"))
    return Finding(
        "serve_queue", "Requests wait in the queue behind full batches: the model is saturated", qs, evidence,
        "make each batch cheaper: quantise (optimize.quantize: dynamic, then ds optimize RUN.yaml) or serve with "
        "ONNX Runtime (serve.runtime: onnxruntime); or run more replicas",
        settings={"optimize.quantize": "dynamic", "serve.runtime": "onnxruntime"}, command="ds optimize RUN.yaml")


def unbatched(facts: dict[str, Any]) -> Finding | None:
    """Requests pile up (in flight, waiting) while every batch holds one: the queue is served one at a time.

    Impact: k requests waiting together could share one forward pass, saving up to 1 - 1/(k+1) of the
    per-request passes; k is the mean queue depth seen at the scrapes.
    """
    batch, peak = _num(facts, "batch_mean"), _num(facts, "in_flight_peak")
    if not (_serving(facts) and batch <= threshold("batch_one_mean") and peak >= threshold("busy_in_flight")):
        return None
    if _num(facts, "queue_share") > threshold("queue_share"):
        return None  # the queue finding already carries this advice
    depth = _num(facts, "queue_depth_mean")
    size = suggested_batch(facts)
    return Finding(
        "serve_queue_unbatched", "Requests queue up while every batch holds one request",
        1 - 1 / (1 + depth) if depth > 0 else 0.05,
        [Evidence("serve_batch_size mean", batch, threshold("batch_one_mean"), "<="),
         Evidence("serve_in_flight_requests peak", peak, threshold("busy_in_flight"), ">="),
         Evidence("serve_queue_depth mean", depth, 0, ">")],
        f"batch concurrent requests: set serve.max_batch_size to {size} (ds serve --max-batch-size {size}) and "
        "give batches time to fill (serve.max_wait_ms: 5)",
        settings={"serve.max_batch_size": size, "serve.max_wait_ms": 5},
        command=f"ds serve MODEL_DIR --max-batch-size {size}")


def inference_bound(facts: dict[str, Any]) -> Finding | None:
    share = _num(facts, "inference_share")
    if not (_serving(facts) and share > threshold("inference_share")):
        return None
    return Finding(
        "serve_inference", "Inference dominates request latency", share * 0.5,  # int8 / ORT: ~2x on the forward
        [Evidence("serve_inference_seconds mean / serve_request_duration_seconds mean", share,
                  threshold("inference_share"), ">")],
        "make the forward pass cheaper: dynamic int8 quantisation (optimize.quantize: dynamic) or ONNX Runtime",
        settings={"optimize.quantize": "dynamic", "serve.runtime": "onnxruntime"}, command="ds optimize RUN.yaml")


def errors(facts: dict[str, Any]) -> Finding | None:
    share = _num(facts, "error_share")
    if not (_serving(facts) and share > threshold("error_share")):
        return None
    return Finding(
        "serve_errors", "Requests fail (non-2xx answers, e.g. 503 when the queue is full)", share,
        [Evidence("serve_requests_total non-2xx share", share, threshold("error_share"), ">")],
        "read the server log for 4xx/5xx causes; for 503s raise serve.queue_size or serve.max_batch_size, "
        "or add replicas", settings={"serve.queue_size": 4096})


def data_bound(facts: dict[str, Any]) -> Finding | None:
    share = _num(facts, "data_share")
    if not (_training(facts) and share > threshold("data_share")):
        return None
    return Finding(
        "train_data", "Data loading stalls training steps", share,
        [Evidence("train_data_wait_seconds / train_step_seconds", share, threshold("data_share"), ">")],
        "load batches in parallel: set train.num_workers to 4 (DataLoader worker processes), and move "
        "per-sample work (decoding, tokenising) into preprocessing", settings={"train.num_workers": 4})


def comm_bound(facts: dict[str, Any]) -> Finding | None:
    share = _num(facts, "comm_share")
    if not (_training(facts) and share > threshold("comm_share")):
        return None
    return Finding(
        "train_comm", "Gradient communication dominates the step", share * 0.5,
        [Evidence("comm_seconds_total / train_step_seconds", share, threshold("comm_share"), ">")],
        "compress gradients (distributed.compression: powersgd or fp16) and/or accumulate more micro-batches "
        "per step (train.grad_accum: 4)", settings={"distributed.compression": "powersgd", "train.grad_accum": 4})


def checkpoint_blocking(facts: dict[str, Any]) -> Finding | None:
    share = _num(facts, "checkpoint_share")
    if not (_training(facts) and share > threshold("checkpoint_share")):
        return None
    return Finding(
        "train_checkpoint", "Checkpoints block training", share,
        [Evidence("train_checkpoint_blocked_seconds / train_step_seconds", share, threshold("checkpoint_share"),
                  ">")],
        "save in the background (checkpoint.async_save: true) and less often (raise checkpoint.every_steps)",
        settings={"checkpoint.async_save": True})


def amp_skips(facts: dict[str, Any]) -> Finding | None:
    steps, skipped = _num(facts, "steps"), _num(facts, "skipped_steps")
    if not (_training(facts) and skipped / steps > threshold("skipped_share")):
        return None
    return Finding(
        "train_amp_skips", "Loss scaling skips optimiser steps (fp16 overflow)", skipped / steps,
        [Evidence("amp_skipped_steps_total / steps", skipped / steps, threshold("skipped_share"), ">")],
        "train in bf16 (train.precision: bf16, no loss scaling needed) or clip gradients (train.clip_norm: 1.0)",
        settings={"train.precision": "bf16", "train.clip_norm": 1.0})


def loss_trouble(facts: dict[str, Any]) -> Finding | None:
    losses = [float(v) for v in facts.get("loss") or []]
    nan_count = sum(1 for v in losses if not math.isfinite(v))
    if nan_count:
        return Finding(
            "train_loss_nan", "The loss is NaN or infinite: the run is learning nothing", 1.0,
            [Evidence("train_loss non-finite values", float(nan_count), 0, ">")],
            "lower the learning rate (train.optimizer.lr: a tenth of now), clip gradients (train.clip_norm: 1.0), "
            "or use bf16 instead of fp16", settings={"train.clip_norm": 1.0})
    factor = threshold("loss_spike_factor")
    spikes = [(i, v) for i, v in enumerate(losses) if i >= 3 and v > factor * statistics.median(losses[:i])]
    if not spikes:
        return None
    i, worst = max(spikes, key=lambda p: p[1] / statistics.median(losses[:p[0]]))
    ratio = worst / statistics.median(losses[:i])
    return Finding(
        "train_loss_spike", f"The loss spikes ({len(spikes)} point(s))", min(0.5, 0.1 * len(spikes)),
        [Evidence("train_loss / running median", ratio, factor, ">")],
        "add warm-up (train.schedule.warmup_steps: 100) and clip gradients (train.clip_norm: 1.0)",
        settings={"train.schedule.warmup_steps": 100, "train.clip_norm": 1.0})


def throughput_regression(facts: dict[str, Any]) -> Finding | None:
    values = [v for v in facts.get("samples_per_s") or [] if math.isfinite(v)]
    values = values[int(len(values) * threshold("warmup_fraction")):]
    if len(values) < 8:
        return None
    quarter = max(2, len(values) // 4)
    reference, late = statistics.median(values[:-quarter]), statistics.median(values[-quarter:])
    ratio = late / reference if reference > 0 else math.nan
    if not ratio < threshold("throughput_drop"):
        return None
    return Finding(
        "train_throughput_drop", "Throughput fell after warm-up", 1 - ratio,
        [Evidence("train_samples_per_second late / post-warm-up median", ratio, threshold("throughput_drop"),
                  "<")],
        "look for what changed: other processes on the machine (thermal or CPU contention), a growing eval or "
        "checkpoint cost, memory pressure; profile a few steps with ds profile RUN.yaml --steps 20",
        command="ds profile RUN.yaml --steps 20")


def restarts(facts: dict[str, Any]) -> Finding | None:
    count, lost = _num(facts, "restarts"), _num(facts, "steps_lost")
    if not count > 0:
        return None
    total_steps = max(_num(facts, "steps"), 1.0)
    return Finding(
        "train_restarts", f"The run restarted {int(count)} time(s)", lost / total_steps if lost > 0 else 0.01,
        [Evidence("resume events", count, 0, ">"), Evidence("steps redone", lost, 0, ">=")],
        "checkpoint more often (checkpoint.every_steps) so fewer steps are redone, and read the log for the cause",
        settings={"checkpoint.every_steps": 100})


def straggler(facts: dict[str, Any]) -> Finding | None:
    """Load balancing (distributed.balance) gives each rank samples in proportion to its speed: a rank whose
    share is far below the largest is slower than its peers."""
    shares = [float(v) for v in facts.get("rank_batch_samples") or []]
    if len(shares) < 2 or max(shares) <= 0:
        return None
    slowest = min(range(len(shares)), key=shares.__getitem__)
    ratio = shares[slowest] / max(shares)
    if not ratio < threshold("straggler_ratio"):
        return None
    return Finding(
        "train_straggler", f"Rank {slowest} is a straggler", 1 - ratio,
        [Evidence(f"train_rank_batch_samples rank {slowest} / largest rank", ratio, threshold("straggler_ratio"),
                  "<")],
        f"rank {slowest} runs {1 / ratio:.1f}x slower than the fastest rank; balancing already gives it less work: "
        "look for CPU contention, thermal throttling or a slower device on its node, or leave it out")


RULES: tuple[Callable[[dict[str, Any]], Finding | None], ...] = (
    queue_bound, unbatched, inference_bound, errors, data_bound, comm_bound, checkpoint_blocking, amp_skips,
    loss_trouble, throughput_regression, restarts, straggler,
)


def diagnose(facts: dict[str, Any]) -> list[Finding]:
    """Every rule that fires, the largest expected impact first."""
    findings = [f for rule in RULES if (f := rule(facts)) is not None]
    return sorted(findings, key=lambda f: -f.impact)
