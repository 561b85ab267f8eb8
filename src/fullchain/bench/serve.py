"""Serving: `ds serve` (dynamic batching) against a plain FastAPI endpoint and LitServe's dynamic batching.

All servers load the same artifact with the same runtime and threads (`fullchain.artifact.load`), the same
preprocessing and the same interpreter setting (the GIL switch interval `ds serve` uses). The plain one is
what a user writes by hand: a sync `def predict(...)` that FastAPI runs in its thread pool (sized to the
machine's cores instead of anyio's 40), one forward pass per request. LitServe is the peer users pick for
batched serving: its own dynamic batching (same max batch size and wait as ours) in its own inference worker.
A closed-loop load generator in its own process drives each server at concurrency 1, 8 and 64. Each round
starts one server at a time (rotating order), loads it at every concurrency and stops it, so no other
server is alive while one is measured; ratios are paired round by round (median and spread). The model is
a ResNet-style CNN (2.8M parameters) on scikit-learn's digits (real 8x8 images): on CPU its batch-1 forward
costs ~10x more per image than a batch of 32, the per-call overhead that batching amortises. (A small
Transformer gains nothing from batching on CPU; on a GPU it would.) With `--device cuda` the servers run
ONNX Runtime's CUDA provider when this onnxruntime build has it (the serving runtimes' only GPU path).
A second part times ONNX Runtime against torch eager on the exported model, batch 1 and batch 32.

    python -m fullchain.bench.serve plain MODEL_DIR --port 8000      # the plain server on its own
    python -m fullchain.bench.serve litserve MODEL_DIR --port 8000   # the LitServe server on its own
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from fullchain.artifact import LoadedModel, load
from fullchain.artifact.meta import ONNX_FILE
from fullchain.bench.harness import BenchRecord, rotated, summarise
from fullchain.config import validate_config
from fullchain.deploy.loadgen import run_load
from fullchain.deploy.payloads import sample_requests
from fullchain.deploy.preprocess import Preprocessor
from fullchain.deploy.process import ServerProcess
from fullchain.deploy.schema import REQUEST_MODELS, PredictResponse
from fullchain.deploy.server import SWITCH_INTERVAL_S
from fullchain.runtime.onnx import compare_latency, export_onnx

CONCURRENCY = (1, 8, 64)
MAX_BATCH_SIZE, MAX_WAIT_MS = 64, 5
BENTOML_NOTE = ("BentoML is not a contender: with this project's pins pip backtracks for over 10 minutes through "
                "bentoml 1.4.x (its opentelemetry ~=0.41b0 pins) and then fails building an old source distribution")


def plain_app(loaded: LoadedModel, pool_threads: int) -> FastAPI:
    pre = Preprocessor(loaded)
    request_model = REQUEST_MODELS[pre.kind]

    @asynccontextmanager
    async def sized_thread_pool(app: FastAPI):
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = pool_threads
        yield

    app = FastAPI(title="plain per-request server", lifespan=sized_thread_pool)

    def predict(body: request_model) -> PredictResponse:  # type: ignore[valid-type]
        logits = loaded.runtime(*pre.collate(pre.encode(getattr(body, pre.field))))
        return PredictResponse(predictions=loaded.task.postprocess(logits))

    app.add_api_route("/v1/predict", predict, methods=["POST"], response_model=PredictResponse)
    app.add_api_route("/readyz", lambda: {"ready": True}, methods=["GET"])
    return app


def _settings(quick: bool) -> dict:
    if quick:
        # the 64-client point, which the acceptance ratios read, gets the longest window
        return {"train_steps": 15, "seconds": {1: 0.5, 8: 0.5, 64: 1.5}, "repeats": 1, "latency_repeats": 20,
                "warmup_s": 0.5}
    return {"train_steps": 200, "seconds": {1: 3.0, 8: 3.0, 64: 5.0}, "repeats": 5, "latency_repeats": 200,
            "warmup_s": 2.0}


def train_model(root: Path, steps: int) -> Path:
    from fullchain.stages.train import train_stage

    cfg = validate_config({
        "name": "bench_serve", "runs_dir": str(root), "seed": 0,
        "model": {"name": "cnn", "args": {"widths": [64, 128, 256], "blocks_per_stage": [2, 2, 2]}},
        "data": {"name": "digits"},
        "train": {"max_steps": steps, "batch_size": 64, "progress": False, "tensorboard": False},
        "checkpoint": {"enabled": False},
    }, source="bench serve")
    return train_stage(cfg).model_dir


def _servers(model_dir: Path, runtime: str, accelerator: str, root: Path) -> dict[str, ServerProcess]:
    common = [str(model_dir), "--runtime", runtime]
    servers = {
        "plain": ServerProcess(["plain", *common], module="fullchain.bench.serve", log=root / "plain.log"),
        "ds_serve": ServerProcess(["serve", *common, "--max-batch-size", str(MAX_BATCH_SIZE), "--max-wait-ms",
                                   str(MAX_WAIT_MS)], log=root / "ds_serve.log"),
    }
    if importlib.util.find_spec("litserve") is not None:  # the bench extra; a bare GPU machine may lack it
        servers["litserve"] = ServerProcess(["litserve", *common, "--accelerator", accelerator],
                                            module="fullchain.bench.serve", ready_path="/health", timeout_s=120,
                                            log=root / "litserve.log")
    return servers


def _serving_runtime(device: str, model_dir: Path) -> tuple[str, str, list[str]]:
    """(runtime, LitServe accelerator, notes): ONNX Runtime's CUDA provider on a GPU, else torch on the CPU."""
    from fullchain.distributed.strategy import resolve_device

    if resolve_device(device).type != "cuda":
        return "torch", "cpu", []
    try:
        import onnxruntime as ort  # optional on the GPU machine: its own build, not carried (26 MB)
    except ImportError:
        return "torch", "cpu", ["--device cuda: onnxruntime is not installed and the torch serving runtime runs on "
                                "the CPU, so every server ran on the CPU"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "torch", "cpu", ["--device cuda: this onnxruntime build has no CUDA provider and the torch serving "
                                "runtime runs on the CPU, so every server ran on the CPU"]
    loaded = load(model_dir, "torch")
    task = loaded.task
    export_onnx(loaded.runtime.model, task.example_inputs(3), model_dir / ONNX_FILE, task.input_names,
                task.dynamic_dims())
    return "onnxruntime", "cuda", []


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    s = _settings(quick)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        model_dir = train_model(root, s["train_steps"])
        runtime, accelerator, notes = _serving_runtime(device, model_dir)
        payloads = root / "payloads.json"
        payloads.write_text(json.dumps(sample_requests(model_dir, n=256)))
        servers = _servers(model_dir, runtime, accelerator, root)
        rounds: dict[str, list[dict]] = {f"{name}_c{c}": [] for c in CONCURRENCY for name in servers}
        drained: list[int] = []
        for i in range(s["repeats"]):
            for name in rotated(list(servers), i):
                server = servers[name].start()
                try:
                    run_load(server.url + "/v1/predict", payloads, 8, s["warmup_s"])  # first calls, lazy set-up
                    for c in CONCURRENCY:
                        res = run_load(server.url + "/v1/predict", payloads, c, s["seconds"][c])
                        errors = sum(v for k, v in res["statuses"].items() if k != "200")
                        rounds[f"{name}_c{c}"].append({"throughput_rps": res["throughput_rps"],
                                                       "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
                                                       "errors": float(errors)})
                finally:
                    code = server.stop()
                if name == "ds_serve":
                    drained.append(code)
        latency = ort_vs_torch(model_dir, root / "model.onnx", s["latency_repeats"])
    record = BenchRecord(
        bench="serve",
        settings={"quick": quick, "runtime": runtime, "threads": "fullchain.runtime default_threads() in every server",
                  "model": "cnn (ResNet-style, widths 64/128/256, 2 blocks per stage, 2.8M params) on digits (8x8)",
                  "concurrency": list(CONCURRENCY), "repeats": s["repeats"],
                  "seconds_per_point": {str(c): t for c, t in s["seconds"].items()},
                  "order": "one server alive at a time, rotating order each round, warmed up after each start",
                  "switch_interval_s": SWITCH_INTERVAL_S,
                  "plain": {"thread_pool": os.cpu_count(), "server": "uvicorn.run defaults"},
                  "ds_serve": {"max_batch_size": MAX_BATCH_SIZE, "max_wait_ms": MAX_WAIT_MS},
                  "litserve": {"max_batch_size": MAX_BATCH_SIZE, "batch_timeout_ms": MAX_WAIT_MS,
                               "workers_per_device": 1, "num_api_servers": 1, "accelerator": accelerator},
                  "load": "closed loop, aiohttp in a separate process, one image per request"},
        results={**summarise(rounds), **latency["results"]},
        notes=[*notes, BENTOML_NOTE],
    )
    for c in CONCURRENCY:
        record.add_ratio(f"batched_vs_plain_throughput_c{c}", rounds, f"ds_serve_c{c}", f"plain_c{c}", "throughput_rps")
    record.add_ratio("batched_vs_plain_p99_c64", rounds, "ds_serve_c64", "plain_c64", "p99_ms")
    if "litserve" in servers:
        for c in CONCURRENCY:
            record.add_ratio(f"ds_vs_litserve_throughput_c{c}", rounds, f"ds_serve_c{c}", f"litserve_c{c}",
                             "throughput_rps")
        record.add_ratio("ds_vs_litserve_p99_c64", rounds, "ds_serve_c64", "litserve_c64", "p99_ms")
    else:
        record.notes.append("LitServe is not installed here (pip install litserve): its contender was skipped")
    record.ratios.update(latency["ratios"])
    record.checks["throughput_c64_at_least_2x"] = record.ratios["batched_vs_plain_throughput_c64"] >= 2.0
    record.checks["p99_c64_no_worse"] = record.ratios["batched_vs_plain_p99_c64"] <= 1.0
    record.checks["no_errors"] = all(r["errors"] == 0 for rs in rounds.values() for r in rs)
    record.checks["ds_serve_drained_on_sigterm"] = all(code == 0 for code in drained)
    return record


def ort_vs_torch(model_dir: Path, onnx_path: Path, repeats: int) -> dict:
    """Median latency of torch eager and ONNX Runtime on the exported model at batch 1 and 32."""
    loaded = load(model_dir, "torch")
    model, task = loaded.runtime.model, loaded.task
    report = export_onnx(model, task.example_inputs(3), onnx_path, task.input_names, task.dynamic_dims())
    results, ratios = {}, {}
    for batch in (1, 32):
        ms = compare_latency(model, onnx_path, task.example_inputs(batch, seed=batch), repeats)
        results[f"latency_b{batch}"] = {**ms, "parity_max_abs_error": report.max_abs_error}
        ratios[f"ort_vs_torch_speed_b{batch}"] = ms["torch_ms"] / ms["onnxruntime_ms"]
    return {"results": results, "ratios": ratios}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the contender servers of ds bench serve")
    parser.add_argument("what", choices=["plain", "litserve"])
    parser.add_argument("model")
    parser.add_argument("--runtime", default=None)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--accelerator", default="cpu", help="LitServe's accelerator (cpu or cuda)")
    args = parser.parse_args(argv)
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # the interpreter setting `ds serve` runs with
    if args.what == "litserve":
        from fullchain.bench.serve_litserve import serve

        serve(args.model, args.runtime, args.port, args.accelerator, MAX_BATCH_SIZE, MAX_WAIT_MS)
        return
    app = plain_app(load(args.model, args.runtime), pool_threads=os.cpu_count() or 1)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
