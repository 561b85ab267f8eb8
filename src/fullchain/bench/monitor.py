"""Monitoring overhead: what a live /metrics endpoint costs a training run that is being scraped.

Three copies of one run (same initialisation and data order, an MLP on digits: ~1 ms steps, the worst case
for a per-step cost) train in alternating chunks (rotating order): with nothing extra (`none`), with
fullchain's endpoint (the `TrainingExporter` callback, FastAPI + uvicorn on a thread), and with what a user
writes with prometheus_client alone (`PlainMetrics`: the same series, updated inline in the loop, served by
its own `start_http_server`). Each endpoint and its scraper (a separate process reading it every 0.25 s, four
times ds-monitor's default) live only during their own contender's chunk: started before it, stopped after
it, so no other contender's server runs while one is timed. `callback_us_per_step` is the time spent
updating the series per step, free of the machine's noise; `scrapes` how often the endpoint was read per chunk.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fullchain import metric_names as M
from fullchain.bench.harness import BenchRecord, alternate, summarise
from fullchain.config import DataConfig, TrainConfig
from fullchain.data import build_data
from fullchain.distributed.strategy import resolve_device
from fullchain.models import build_model, model_args_from_data
from fullchain.monitor.exporter import TrainingExporter
from fullchain.train.trainer import Trainer

SCRAPE_INTERVAL_S = 0.25
SCRAPER = """
import signal, sys, time, httpx
url, interval, scrapes = sys.argv[1], float(sys.argv[2]), 0
signal.signal(signal.SIGTERM, lambda *_: (print(scrapes, flush=True), sys.exit(0)))
with httpx.Client(timeout=2) as client:
    while True:
        client.get(url).raise_for_status()
        scrapes += 1
        if scrapes == 1:
            print("ready", flush=True)
        time.sleep(interval)
"""


class PlainMetrics:
    """What a prometheus_client user writes: the same series as ours, set inline in the loop."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.step = Gauge(M.STEP, "optimiser steps taken", registry=self.registry)
        self.loss = Gauge(M.TRAIN_LOSS, "training loss at the last logged step", registry=self.registry)
        self.samples = Counter(M.TRAIN_SAMPLES_TOTAL.removesuffix("_total"), "training samples consumed",
                               registry=self.registry)
        self.step_seconds = Histogram(M.TRAIN_STEP_SECONDS, "wall time of one optimiser step", registry=self.registry)

    def update(self, step: int, step_s: float, samples: int, loss: float | None) -> None:
        self.step.set(step)
        self.step_seconds.observe(step_s)
        self.samples.inc(samples)
        if loss is not None:
            self.loss.set(loss)


@contextmanager
def _scraped(url: str) -> Iterator[dict[str, int]]:
    """A scraper process reading `url` until the block ends; yields {"scrapes": n}, filled in at the end."""
    scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, url, str(SCRAPE_INTERVAL_S)], stdout=subprocess.PIPE,
                               text=True)
    counted = {"scrapes": 0}
    try:
        if scraper.stdout.readline().strip() != "ready":
            raise RuntimeError(f"monitor-overhead: the scraper could not read {url}")
        yield counted
    finally:
        scraper.terminate()
        out, _ = scraper.communicate(timeout=30)
        counted["scrapes"] = int(out.split()[-1]) if out.split() else 0


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    dev = resolve_device(device)
    chunk_steps, repeats, batch_size = (20, 2, 32) if quick else (300, 12, 32)
    bundle = build_data(DataConfig(name="digits", val_fraction=0.0), seed=0)
    args = model_args_from_data("mlp", bundle.input_spec, {})
    torch.manual_seed(0)
    init = build_model(name="mlp", args=args).state_dict()

    trainers, steps = {}, {}
    for name in ("none", "fullchain", "prometheus_client"):
        model = build_model(name="mlp", args=args)
        model.load_state_dict(init)
        config = TrainConfig(max_steps=10**9, batch_size=batch_size, device=str(dev), progress=False,
                             tensorboard=False)
        trainers[name] = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), bundle.train,
                                 config=config, collate_fn=bundle.collate)
        steps[name] = trainers[name].epoch_steps()

    def train_chunk(name: str, on_step: Callable[[int, float, int, dict], None] | None) -> dict[str, float]:
        """`chunk_steps` steps as `fit` runs them, each followed by `on_step` (the endpoint's update)."""
        trainer = trainers[name]
        samples, in_update, start = 0, 0.0, time.perf_counter()
        last = start
        for _ in range(chunk_steps):
            micro_batches = next(steps[name], None)
            if micro_batches is None:
                steps[name] = trainer.epoch_steps()
                micro_batches = next(steps[name])
            out = trainer.train_step(micro_batches)
            trainer.step += 1
            n = sum(len(y) for _, y in micro_batches)
            samples += n
            logged = trainer.step % 10 == 0
            metrics = {"logged": logged, M.TRAIN_LOSS: float(out["loss"]), M.DATA_WAIT_SECONDS: 0.0,
                       M.TRAIN_SAMPLES_TOTAL: trainer.step * batch_size} if logged else {"logged": False}
            if on_step is not None:
                called = time.perf_counter()
                on_step(n, called - last, trainer.step, metrics)
                in_update += time.perf_counter() - called
            last = time.perf_counter()
        seconds = time.perf_counter() - start
        return {"samples_per_s": samples / seconds, "step_ms": 1000 * seconds / chunk_steps,
                "callback_us_per_step": 1e6 * in_update / chunk_steps}

    def none() -> dict[str, float]:
        return train_chunk("none", None)

    def ours() -> dict[str, float]:
        exporter = TrainingExporter(port=0)
        try:
            with _scraped(exporter.url + "/metrics") as counted:
                result = train_chunk("fullchain", lambda n, dt, step, m: exporter.on_step_end(trainers["fullchain"], m))
        finally:
            exporter.close()
        return {**result, "scrapes": float(counted["scrapes"])}

    def plain() -> dict[str, float]:
        metrics = PlainMetrics()
        server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
        try:
            with _scraped(f"http://127.0.0.1:{server.server_port}/metrics") as counted:
                result = train_chunk("prometheus_client", lambda n, dt, step, m: metrics.update(
                    step, dt, n, m.get(M.TRAIN_LOSS)))
        finally:
            server.shutdown()
            server.server_close()
            thread.join(10)
        return {**result, "scrapes": float(counted["scrapes"])}

    rounds = alternate({"none": none, "fullchain": ours, "prometheus_client": plain}, repeats=repeats, warmup=1)
    record = BenchRecord(
        bench="monitor-overhead",
        settings={"quick": quick, "data": f"digits: {len(bundle.train)} train", "model": "mlp", "model_args": args,
                  "batch_size": batch_size, "chunk_steps": chunk_steps, "repeats": repeats,
                  "scrape_interval_s": SCRAPE_INTERVAL_S,
                  "isolation": "each endpoint and its scraper run only during their own contender's chunks"},
        results=summarise(rounds),
    )
    record.add_ratio("fullchain_vs_none_speed", rounds, "fullchain", "none", "samples_per_s")
    record.add_ratio("prometheus_client_vs_none_speed", rounds, "prometheus_client", "none", "samples_per_s")
    record.add_ratio("fullchain_vs_prometheus_client_speed", rounds, "fullchain", "prometheus_client",
                     "samples_per_s")
    record.checks["scraped_throughout"] = all(r["scrapes"] >= 1 for name in ("fullchain", "prometheus_client")
                                              for r in rounds[name])
    return record
