"""The deploy stages of `ds run`: export (with parity) and a short serve-and-load check.

`export_stage` writes `model.onnx` beside the artifact and records parity and ONNX Runtime against torch
latency; `serve_stage` starts `ds serve` on a free 127.0.0.1 port, drives it with the closed-loop load
generator for `serve.load_seconds` at `serve.load_concurrency`, stops it with SIGTERM and records
throughput, latency percentiles and whether it drained cleanly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from fullchain.config import RunConfig
from fullchain.deploy.export import export_artifact
from fullchain.deploy.loadgen import run_load
from fullchain.deploy.payloads import sample_requests
from fullchain.deploy.process import ServerProcess


def export_stage(cfg: RunConfig, model_dir: Path, console: Console) -> dict[str, Any]:
    report = export_artifact(model_dir, None, cfg.export.format, cfg.export.dynamic_batch, cfg.export.opset,
                             trust_code=cfg.model.target is not None)
    for note in report.notes:
        console.print(f"export: {note}", highlight=False)
    if not report.parity_ok:
        console.print(f"[bold red]export: ONNX differs from torch by {report.max_abs_error:.2e}[/]")
    return {
        "format": cfg.export.format,
        "path": report.path,
        "exporter": report.exporter,
        "parity_ok": report.parity_ok,
        "parity_max_abs_error": report.max_abs_error,
        "latency_ms_batch1": report.latency_ms,
    }


def serve_stage(cfg: RunConfig, model_dir: Path, console: Console) -> dict[str, Any]:
    s = cfg.serve
    payloads = cfg.run_dir / "serve-requests.json"
    payloads.write_text(json.dumps(sample_requests(model_dir, n=128)))
    args = ["serve", str(model_dir), "--runtime", s.runtime, "--max-batch-size", str(s.max_batch_size),
            "--max-wait-ms", str(s.max_wait_ms), "--queue-size", str(s.queue_size)]
    args += ["--threads", str(s.threads)] if s.threads else []
    args += ["--trust-code"] if cfg.model.target is not None else []  # the run file's own model code
    server = ServerProcess(args, log=cfg.run_dir / "serve.log")
    with console.status(f"serving {model_dir} ({s.runtime}) under load for {s.load_seconds:g}s"):
        with server:
            load = run_load(server.url + "/v1/predict", payloads, s.load_concurrency, s.load_seconds)
    payloads.unlink()
    return {
        "runtime": s.runtime,
        "concurrency": s.load_concurrency,
        "seconds": s.load_seconds,
        "throughput_rps": round(load["throughput_rps"], 1),
        "p50_ms": round(load["p50_ms"], 2),
        "p99_ms": round(load["p99_ms"], 2),
        "statuses": load["statuses"],
        "drained_on_sigterm": server.proc.returncode == 0,
    }
