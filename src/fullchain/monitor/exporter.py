"""The training run's live endpoint: Prometheus ``/metrics`` and the ``/dashboard`` page, as a Trainer callback.

`TrainingExporter` turns the Trainer's events into prometheus_client series with the names of
`fullchain.metric_names` (the same keys as ``metrics.jsonl``) in a registry of its own, and serves them
with FastAPI + uvicorn on a background thread. The pipeline attaches it when ``monitor.port`` is set; the
Trainer itself knows nothing of it. Per-step wall time is measured here, between step-end events, so it
includes data wait, evaluation and checkpoint saves: the whole cost of a step as the run experiences it.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest

from fullchain import metric_names as M
from fullchain.monitor.dashboard import dashboard_router
from fullchain.train.callbacks import Callback

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAUGES = {
    M.STEP: "optimiser steps taken",
    M.TRAIN_LOSS: "training loss at the last logged step",
    M.LEARNING_RATE: "learning rate",
    M.GRAD_NORM: "gradient norm before clipping",
    M.TRAIN_SAMPLES_TOTAL: "training samples consumed",
    M.TRAIN_SAMPLES_PER_SECOND: "training samples per second over the last log interval",
    M.AMP_SKIPPED_STEPS_TOTAL: "steps skipped by fp16 loss scaling",
    M.AMP_LOSS_SCALE: "fp16 loss scale",
    M.COMM_BYTES_TOTAL: "gradient bytes sent",
    M.COMM_SECONDS_TOTAL: "seconds spent in gradient communication",
    M.EVAL_LOSS: "loss at the last evaluation",
    M.EVAL_ACCURACY: "accuracy at the last evaluation",
}


def metrics_app(registry: CollectorRegistry) -> FastAPI:
    """GET /metrics (this registry) and GET /dashboard."""
    app = FastAPI(title="fullchain training metrics", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(dashboard_router())
    return app


class MetricsServer:
    """uvicorn on a daemon thread; `port` is the bound port (useful with port 0)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, name="fullchain-metrics", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"metrics endpoint could not listen on {host}:{port} (port in use?)")
            time.sleep(0.01)
        self.host = host
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)


class TrainingMetrics(Callback):
    """The run's series in a registry of its own, updated from the Trainer's events (no server)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gauges = {name: Gauge(name, doc, registry=self.registry) for name, doc in GAUGES.items()}
        self.step_seconds = Histogram(M.TRAIN_STEP_SECONDS, "wall time of one optimiser step, data wait included",
                                      buckets=STEP_BUCKETS, registry=self.registry)
        self.data_wait = Histogram(M.DATA_WAIT_SECONDS, "time a step waited for its batches (per-step mean of "
                                   "each log interval)", buckets=STEP_BUCKETS, registry=self.registry)
        self.checkpoint_blocked = Histogram(M.CHECKPOINT_BLOCKED_SECONDS, "time save() held the training loop",
                                            buckets=STEP_BUCKETS, registry=self.registry)
        self._last_step_end: float | None = None
        self._steps_since_log = 0
        self._last_checkpoint_step: int | None = None

    def on_train_start(self, trainer: Any) -> None:
        self._last_step_end = time.perf_counter()
        self.gauges[M.STEP].set(trainer.step)

    def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None:
            self.step_seconds.observe(now - self._last_step_end)
        self._last_step_end = now
        self._steps_since_log += 1
        self.gauges[M.STEP].set(trainer.step)
        self._observe_checkpoint(trainer)
        if not metrics.get("logged"):
            return
        wait = metrics.get(M.DATA_WAIT_SECONDS)
        if wait is not None:
            for _ in range(self._steps_since_log):  # the Trainer reports the interval's sum; spread it per step
                self.data_wait.observe(wait / self._steps_since_log)
        self._steps_since_log = 0
        for name, gauge in self.gauges.items():
            value = metrics.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                gauge.set(value)

    def _observe_checkpoint(self, trainer: Any) -> None:
        checkpointer = getattr(trainer, "checkpointer", None)
        if checkpointer is None:
            return
        stats = checkpointer.last_save_stats
        if stats and stats.get("step") != self._last_checkpoint_step and math.isfinite(stats.get("blocked_s", 0)):
            self._last_checkpoint_step = stats["step"]
            self.checkpoint_blocked.observe(stats["blocked_s"])

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        for name in (M.EVAL_LOSS, M.EVAL_ACCURACY):
            if isinstance(metrics.get(name), int | float):
                self.gauges[name].set(metrics[name])


class TrainingExporter(TrainingMetrics):
    """Serves the run's metrics while it trains; `linger_s` keeps the endpoint up after the end for scrapers."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, linger_s: float = 0.0):
        super().__init__()
        self.server = MetricsServer(metrics_app(self.registry), host, port)
        self.linger_s = linger_s
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    def on_train_end(self, trainer: Any, result: Any) -> None:
        self._closed.wait(self.linger_s)  # cut short by close()
        self.close()

    def close(self) -> None:
        self._closed.set()
        self.server.close()
