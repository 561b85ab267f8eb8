"""The serve stage of `ds run`: a short serve-and-load check of the artifact the earlier stages produced.

`serve_stage` starts `ds serve` on a free 127.0.0.1 port, drives it with the closed-loop load generator for
`serve.load_seconds` at `serve.load_concurrency`, stops it with SIGTERM and records throughput, latency
percentiles, the status counts and whether it drained cleanly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from fullchain.artifact import quantization_of, resolve_runtime
from fullchain.config import RunConfig
from fullchain.deploy.loadgen import run_load
from fullchain.deploy.payloads import sample_requests
from fullchain.deploy.process import ServerProcess


def serve_stage(cfg: RunConfig, model_dir: Path, console: Console) -> dict[str, Any]:
    """Serve `model_dir` under load; an int8 artifact with the runtime its program needs, others with
    ``serve.runtime``."""
    s = cfg.serve
    runtime = s.runtime if quantization_of(model_dir) is None else resolve_runtime(model_dir, None)
    payloads = cfg.run_dir / "serve-requests.json"
    payloads.write_text(json.dumps(sample_requests(model_dir, n=128)))
    args = ["serve", str(model_dir), "--runtime", runtime, "--max-batch-size", str(s.max_batch_size),
            "--max-wait-ms", str(s.max_wait_ms), "--queue-size", str(s.queue_size)]
    args += ["--threads", str(s.threads)] if s.threads else []
    args += ["--trust-code"] if cfg.model.target is not None else []  # the run file's own model code
    server = ServerProcess(args, log=cfg.run_dir / "serve.log")
    with console.status(f"serving {model_dir} ({runtime}) under load for {s.load_seconds:g}s"):
        with server:
            load = run_load(server.url + "/v1/predict", payloads, s.load_concurrency, s.load_seconds)
    payloads.unlink()
    return {
        "runtime": runtime,
        "concurrency": s.load_concurrency,
        "seconds": s.load_seconds,
        "throughput_rps": round(load["throughput_rps"], 1),
        "p50_ms": round(load["p50_ms"], 2),
        "p99_ms": round(load["p99_ms"], 2),
        "statuses": load["statuses"],
        "drained_on_sigterm": server.proc.returncode == 0,
    }
