"""Gradient communication (C5, C6): bytes per step, step time and accuracy of each compression setting.

Every contender is a real `ds train --nproc-per-node N` run (torchrun, gloo) of the same model, data order
and seed; only `distributed.compression` / `distributed.hierarchical` differ. Bytes are the hook's own count
of what rank 0 sent per compressed step (after the uncompressed warm-up); accuracy is the last evaluation on
the held-out validation split. On loopback the link is not the bottleneck, so compression costs time here
instead of saving it: this benchmark on loopback measures traffic and accuracy; time savings need a slow
link (the emulated-cluster recipe, which is not part of this benchmark yet).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from fullchain.bench.harness import BenchRecord
from fullchain.errors import UserError


def _run(root: Path, name: str, nproc: int, steps: int, distributed: dict, model_args: dict) -> dict[str, float]:
    run_yaml = root / f"{name}.yaml"
    run_yaml.write_text(yaml.safe_dump({
        "name": name, "runs_dir": str(root / "runs"), "seed": 0,
        "model": {"name": "mlp", "args": model_args},
        "data": {"name": "digits", "val_fraction": 0.15, "test_fraction": 0.15},
        "train": {"max_steps": steps, "batch_size": 32, "progress": False, "tensorboard": False, "log_every": 5,
                  "eval_every": steps, "optimizer": {"lr": 2e-3}},
        "checkpoint": {"enabled": False},
        "distributed": {"compression_start_step": 10, **distributed},
    }))
    cmd = [sys.executable, "-m", "fullchain.cli", "train", str(run_yaml), "--nproc-per-node", str(nproc)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise UserError(f"comm bench: contender {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "comm_bytes_total" in r]
    after_warmup = [r for r in train if r["step"] >= 20]
    first, last = after_warmup[0], after_warmup[-1]
    steps_between = last["step"] - first["step"]
    seconds = last["time"] - first["time"]
    return {
        "bytes_per_step": (last["comm_bytes_total"] - first["comm_bytes_total"]) / steps_between,
        "comm_s_per_step": (last["comm_seconds_total"] - first["comm_seconds_total"]) / steps_between,
        "step_ms": 1000 * seconds / steps_between,
        "val_accuracy": [r for r in rows if "eval_accuracy" in r][-1]["eval_accuracy"],
    }


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    nproc, steps = (2, 150) if quick else (4, 400)
    model_args = {"hidden": [512, 512], "dropout": 0.0}
    contenders = {"fp32": {"compression": "none"}, "int8": {"compression": "int8"}}
    if not quick:
        contenders.update({
            "fp16": {"compression": "fp16"},
            "bf16": {"compression": "bf16"},
            "powersgd": {"compression": "powersgd"},
            "int8_hierarchical": {"compression": "int8", "hierarchical": True, "topology": {"procs_per_node": 2}},
        })
    with tempfile.TemporaryDirectory(prefix="fullchain-comm-bench-") as tmp:
        results = {name: _run(Path(tmp), name, nproc, steps, dist_cfg, model_args)
                   for name, dist_cfg in contenders.items()}
    record = BenchRecord(
        bench="comm",
        settings={
            "quick": quick, "ranks": nproc, "backend": "gloo", "link": "loopback (no bandwidth limit)",
            "model": "mlp", "model_args": model_args, "data": "digits (scikit-learn), 15% validation split",
            "steps": steps, "batch_size_per_rank": 32, "compression_start_step": 10, "int8_chunk_size": 256,
        },
        results=results,
        notes=["loopback: compression does not pay for itself in time here; the emulated slow-link run is "
               "still to be done (see docs/benchmarks.md)"],
    )
    fp32 = results["fp32"]
    for name, res in results.items():
        if name != "fp32":
            record.ratios[f"{name}_bytes_vs_fp32"] = res["bytes_per_step"] / fp32["bytes_per_step"]
            record.ratios[f"{name}_accuracy_vs_fp32"] = res["val_accuracy"] / fp32["val_accuracy"]
            record.ratios[f"{name}_step_time_vs_fp32"] = res["step_ms"] / fp32["step_ms"]
    record.checks["int8_wire_at_most_27pct"] = record.ratios["int8_bytes_vs_fp32"] <= 0.27
    record.checks["int8_keeps_98pct_accuracy"] = record.ratios["int8_accuracy_vs_fp32"] >= 0.98
    return record
