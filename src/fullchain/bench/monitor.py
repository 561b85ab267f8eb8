"""Monitoring overhead: what a live /metrics endpoint costs a training run that is being scraped.

Three copies of one run (same initialisation and data order, an MLP on digits: ~1 ms steps, the worst case
for a per-step cost) train in alternating chunks: with no endpoint, with fullchain's endpoint (the
`TrainingExporter` callback, FastAPI + uvicorn on a thread), and with the same series served by
prometheus_client's own `start_http_server` (the plain choice). A separate process scrapes each endpoint
every 0.25 s (four times ds-monitor's default) for the whole run, so serving cost lands in the measurement.
`callback_us_per_step` is the callback's own time per step (updating the series), free of the machine's noise.
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch
from prometheus_client import start_http_server

from fullchain import metric_names as M
from fullchain.bench.harness import BenchRecord, alternate, paired_ratio, summarise
from fullchain.config import DataConfig, TrainConfig
from fullchain.data import build_data
from fullchain.distributed.strategy import resolve_device
from fullchain.models import build_model, model_args_from_data
from fullchain.monitor.exporter import TrainingExporter, TrainingMetrics
from fullchain.train.trainer import Trainer

SCRAPE_INTERVAL_S = 0.25
SCRAPER = """
import sys, time, httpx
urls, interval = sys.argv[1:-1], float(sys.argv[-1])
with httpx.Client(timeout=2) as client:
    while True:
        for url in urls:
            client.get(url).raise_for_status()
        time.sleep(interval)
"""


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    dev = resolve_device(device)
    chunk_steps, repeats, batch_size = (20, 2, 32) if quick else (300, 12, 32)
    bundle = build_data(DataConfig(name="digits", val_fraction=0.0), seed=0)
    args = model_args_from_data("mlp", bundle.input_spec, {})
    torch.manual_seed(0)
    init = build_model(name="mlp", args=args).state_dict()

    fullchain_endpoint = TrainingExporter(port=0)
    plain = TrainingMetrics()
    plain_server, _ = start_http_server(0, addr="127.0.0.1", registry=plain.registry)
    callbacks = {"none": None, "fullchain": fullchain_endpoint, "prometheus_client": plain}
    urls = [fullchain_endpoint.url + "/metrics", f"http://127.0.0.1:{plain_server.server_port}/metrics"]
    scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, *urls, str(SCRAPE_INTERVAL_S)])

    trainers, steps = {}, {}
    for name in callbacks:
        model = build_model(name="mlp", args=args)
        model.load_state_dict(init)
        config = TrainConfig(max_steps=10**9, batch_size=batch_size, device=str(dev), progress=False,
                             tensorboard=False)
        trainers[name] = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), bundle.train,
                                 config=config, collate_fn=bundle.collate)
        steps[name] = trainers[name].epoch_steps()

    def chunk(name: str) -> dict[str, float]:
        """`chunk_steps` steps as `fit` runs them: a step, then the callback with the logged figures."""
        trainer, callback = trainers[name], callbacks[name]
        samples, in_callback, start = 0, 0.0, time.perf_counter()
        for _ in range(chunk_steps):
            micro_batches = next(steps[name], None)
            if micro_batches is None:
                steps[name] = trainer.epoch_steps()
                micro_batches = next(steps[name])
            out = trainer.train_step(micro_batches)
            trainer.step += 1
            samples += sum(len(y) for _, y in micro_batches)
            logged = trainer.step % 10 == 0
            metrics = {"logged": logged, M.TRAIN_LOSS: float(out["loss"]), M.DATA_WAIT_SECONDS: 0.0,
                       M.TRAIN_SAMPLES_TOTAL: trainer.step * batch_size} if logged else {"logged": False}
            if callback is not None:
                called = time.perf_counter()
                callback.on_step_end(trainer, metrics)
                in_callback += time.perf_counter() - called
        seconds = time.perf_counter() - start
        return {"samples_per_s": samples / seconds, "step_ms": 1000 * seconds / chunk_steps,
                "callback_us_per_step": 1e6 * in_callback / chunk_steps}

    try:
        rounds = alternate({name: (lambda n=name: chunk(n)) for name in callbacks}, repeats=repeats, warmup=1)
        alive = scraper.poll() is None
    finally:
        scraper.terminate()
        scraper.wait(10)
        fullchain_endpoint.close()
        plain_server.shutdown()
    steps_seen = fullchain_endpoint.registry.get_sample_value(M.STEP)
    record = BenchRecord(
        bench="monitor-overhead",
        settings={"quick": quick, "data": f"digits: {len(bundle.train)} train", "model": "mlp", "model_args": args,
                  "batch_size": batch_size, "chunk_steps": chunk_steps, "repeats": repeats,
                  "scrape_interval_s": SCRAPE_INTERVAL_S},
        results=summarise(rounds),
    )
    record.ratios["fullchain_vs_none_speed"] = paired_ratio(rounds, "fullchain", "none", "samples_per_s")
    record.ratios["prometheus_client_vs_none_speed"] = paired_ratio(rounds, "prometheus_client", "none",
                                                                   "samples_per_s")
    record.ratios["fullchain_vs_prometheus_client_speed"] = paired_ratio(rounds, "fullchain", "prometheus_client",
                                                                        "samples_per_s")
    record.checks["scraped_throughout"] = alive and bool(steps_seen)
    return record
