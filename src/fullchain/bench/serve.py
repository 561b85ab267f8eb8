"""Serving: `ds serve` (dynamic batching) against a plain FastAPI endpoint that calls the model per request.

Both servers load the same artifact with the same runtime (`fullchain.artifact.load`), the same request schema and the
same preprocessing; the only difference is batching. The plain one is what a user writes by hand: a sync
`def predict(...)` that FastAPI runs in its thread pool, one forward pass per request. A closed-loop load
generator in its own process drives each server at concurrency 1, 8 and 64, alternating servers, and
reports throughput and p50/p99 latency. The model is a ResNet-style CNN (2.8M parameters) on scikit-learn's
digits (real 8x8 images): on CPU its batch-1 forward costs ~10x more per image than a batch of 32, the
per-call overhead that batching amortises. (A small Transformer gains nothing from batching on CPU; on a
GPU it would.)
A second part times ONNX Runtime against torch eager on the exported model, batch 1 and batch 32.

    python -m fullchain.bench.serve plain MODEL_DIR --port 8000   # the plain server on its own
"""

import argparse
import json
import tempfile
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from fullchain.artifact import LoadedModel, load
from fullchain.bench.harness import BenchRecord, paired_ratio, summarise
from fullchain.config import validate_config
from fullchain.deploy.loadgen import run_load
from fullchain.deploy.payloads import sample_requests
from fullchain.deploy.preprocess import Preprocessor
from fullchain.deploy.process import ServerProcess
from fullchain.deploy.schema import REQUEST_MODELS, PredictResponse
from fullchain.runtime.onnx import compare_latency, export_onnx

CONCURRENCY = (1, 8, 64)


def plain_app(loaded: LoadedModel) -> FastAPI:
    pre = Preprocessor(loaded)
    request_model = REQUEST_MODELS[pre.kind]
    app = FastAPI(title="plain per-request server")

    def predict(body: request_model) -> PredictResponse:  # type: ignore[valid-type]
        logits = loaded.runtime(*pre.collate(pre.encode(getattr(body, pre.field))))
        return PredictResponse(predictions=loaded.task.postprocess(logits))

    app.add_api_route("/v1/predict", predict, methods=["POST"], response_model=PredictResponse)
    app.add_api_route("/readyz", lambda: {"ready": True}, methods=["GET"])
    return app


def _settings(quick: bool) -> dict:
    if quick:
        # the 64-client point, which the acceptance ratio reads, gets the longest window
        return {"train_steps": 15, "seconds": {1: 1.5, 8: 1.5, 64: 3.0}, "repeats": 1, "latency_repeats": 20}
    return {"train_steps": 200, "seconds": {1: 6.0, 8: 6.0, 64: 6.0}, "repeats": 3, "latency_repeats": 200}


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


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    s = _settings(quick)
    runtime = "torch"
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        model_dir = train_model(root, s["train_steps"])
        payloads = root / "payloads.json"
        payloads.write_text(json.dumps(sample_requests(model_dir, n=256)))
        servers = {
            "plain": ServerProcess(["plain", str(model_dir), "--runtime", runtime], module="fullchain.bench.serve",
                                   log=root / "plain.log"),
            "ds_serve": ServerProcess(["serve", str(model_dir), "--runtime", runtime, "--max-batch-size", "64",
                                       "--max-wait-ms", "5"], log=root / "ds_serve.log"),
        }
        rounds: dict[str, list[dict]] = {f"{name}_c{c}": [] for c in CONCURRENCY for name in servers}
        try:
            for server in servers.values():
                server.launch()
            for server in servers.values():
                server.wait_ready()
            names = list(servers)
            for i in range(s["repeats"]):
                for c in CONCURRENCY:
                    order = names if (i + c) % 2 == 0 else names[::-1]
                    for name in order:
                        res = run_load(servers[name].url + "/v1/predict", payloads, c, s["seconds"][c])
                        errors = sum(v for k, v in res["statuses"].items() if k != "200")
                        rounds[f"{name}_c{c}"].append({"throughput_rps": res["throughput_rps"],
                                                       "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
                                                       "errors": float(errors)})
        finally:
            drained = {name: server.stop() for name, server in servers.items()}
        latency = ort_vs_torch(model_dir, root / "model.onnx", s["latency_repeats"])
    results = summarise(rounds)
    record = BenchRecord(
        bench="serve",
        settings={"quick": quick, "runtime": runtime,
                  "model": "cnn (ResNet-style, widths 64/128/256, 2 blocks per stage, 2.8M params) on digits (8x8)",
                  "concurrency": list(CONCURRENCY), "repeats": s["repeats"],
                  "seconds_per_point": {str(c): t for c, t in s["seconds"].items()},
                  "ds_serve": {"max_batch_size": 64, "max_wait_ms": 5},
                  "load": "closed loop, aiohttp in a separate process, one image per request"},
        results={**results, **latency["results"]},
    )
    for c in CONCURRENCY:
        record.ratios[f"batched_vs_plain_throughput_c{c}"] = paired_ratio(rounds, f"ds_serve_c{c}", f"plain_c{c}",
                                                                          "throughput_rps")
    record.ratios["batched_vs_plain_p99_c64"] = paired_ratio(rounds, "ds_serve_c64", "plain_c64", "p99_ms")
    record.ratios.update(latency["ratios"])
    record.checks["throughput_c64_at_least_2x"] = record.ratios["batched_vs_plain_throughput_c64"] >= 2.0
    record.checks["p99_c64_no_worse"] = record.ratios["batched_vs_plain_p99_c64"] <= 1.0
    record.checks["no_errors"] = all(r["errors"] == 0 for rs in rounds.values() for r in rs)
    record.checks["ds_serve_drained_on_sigterm"] = drained["ds_serve"] == 0
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
    parser = argparse.ArgumentParser(description="the plain per-request server of ds bench serve")
    parser.add_argument("what", choices=["plain"])
    parser.add_argument("model")
    parser.add_argument("--runtime", default=None)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    app = plain_app(load(args.model, args.runtime))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
