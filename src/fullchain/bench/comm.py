"""Gradient communication (C5, C6): bytes per step, step time and accuracy of each compression setting.

Every contender is a real `ds train --nproc-per-node N` run (torchrun, gloo) of the same model, data order
and seed; only `distributed.compression` / `distributed.hierarchical` differ. Bytes are the hook's own count
of what rank 0 sent per compressed step (after the uncompressed warm-up); accuracy is the last evaluation on
the held-out validation split. On loopback the link is not the bottleneck, so compression costs time here
instead of saving it. The full run therefore runs on the emulated cluster (fullchain.distributed.emulated_cluster:
2 network-namespace nodes x 2 ranks, each node's link limited by tc tbf to 1 Gbit/s, then 100 Mbit/s); node 0 also
reads the bytes its link carried from the kernel's veth counter, a cross-check of the hooks' own count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from fullchain.bench.harness import BenchRecord
from fullchain.distributed import emulated_cluster as cluster
from fullchain.errors import UserError


def _write_run(root: Path, name: str, steps: int, distributed: dict, model_args: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
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
    return run_yaml


def _read_metrics(root: Path, name: str) -> dict[str, float | None]:
    rows = [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "comm_bytes_total" in r]
    after_warmup = [r for r in train if r["step"] >= 20]
    first, last = after_warmup[0], after_warmup[-1]
    steps_between = last["step"] - first["step"]

    def per_step(key: str) -> float | None:
        # native DDP (fp32) overlaps its all-reduce with backward and has no hook to time it: None
        return (last[key] - first[key]) / steps_between if key in last else None

    return {
        "bytes_per_step": per_step("comm_bytes_total"),
        "inter_node_bytes_per_step": per_step("comm_inter_node_bytes_total"),
        "comm_s_per_step": per_step("comm_seconds_total"),
        "step_ms": 1000 * (last["time"] - first["time"]) / steps_between,
        "val_accuracy": [r for r in rows if "eval_accuracy" in r][-1]["eval_accuracy"],
    }


def _failed(name: str, stderr: str) -> UserError:
    return UserError(f"comm bench: contender {name} failed: {stderr.strip().splitlines()[-1:]}")


def _run_local(root: Path, name: str, nproc: int, steps: int, distributed: dict, model_args: dict) -> dict:
    run_yaml = _write_run(root, name, steps, distributed, model_args)
    cmd = [sys.executable, "-m", "fullchain.cli", "train", str(run_yaml), "--nproc-per-node", str(nproc)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise _failed(name, done.stderr)
    return _read_metrics(root, name)


def _run_emulated(root: Path, name: str, steps: int, distributed: dict, model_args: dict, port: int) -> dict:
    """2 nodes x 2 ranks in network namespaces; node 0 also reads what its link carried from the kernel."""
    run_yaml = _write_run(root, name, steps, distributed, model_args)
    before = cluster.tx_bytes(0)
    nodes = [subprocess.Popen(cluster.node_command(i, 2, 2, port, [str(run_yaml)]), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for i in (1, 0)]
    try:
        errors = [node.communicate(timeout=900)[1] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)
        raise UserError(f"comm bench: contender {name} did not finish within 900 s on the emulated cluster") from None
    if nodes[1].returncode != 0:
        raise _failed(name, errors[1])
    result = _read_metrics(root, name)
    result["link_tx_bytes_per_step_node0"] = (cluster.tx_bytes(0) - before) / steps  # whole run incl. set-up
    return result


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    contenders = {"fp32": {"compression": "none"}, "int8": {"compression": "int8"}}
    if not quick:
        contenders.update({
            "fp16": {"compression": "fp16"},
            "bf16": {"compression": "bf16"},
            "powersgd": {"compression": "powersgd"},
            "int8_hierarchical": {"compression": "int8", "hierarchical": True, "topology": {"procs_per_node": 2}},
        })
    unavailable = None if quick else cluster.available()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fullchain-comm-bench-") as tmp:
        root = Path(tmp)
        if quick or unavailable:
            model_args = {"hidden": [512, 512], "dropout": 0.0}
            steps, nproc, rates = (150, 2, ["loopback"]) if quick else (60, 4, ["loopback"])
            link = "loopback" if quick else f"loopback (emulated cluster unavailable: {unavailable})"
            results = {name: _run_local(root, name, nproc, steps, cfg, model_args) for name, cfg in contenders.items()}
        else:
            model_args = {"hidden": [1024, 1024], "dropout": 0.0}
            steps, nproc, rates = 50, 4, ["1gbit", "100mbit"]
            link = "emulated cluster: 2 network-namespace nodes x 2 ranks, each node's link limited by tc tbf"
            try:
                for i, rate in enumerate(rates):
                    cluster.up(2, rate)
                    for j, (name, cfg) in enumerate(contenders.items()):
                        results[f"{name}@{rate}"] = _run_emulated(root / rate, name, steps, cfg, model_args,
                                                                  port=29400 + 10 * i + j)
            finally:
                cluster.down()
    record = BenchRecord(
        bench="comm",
        settings={
            "quick": quick, "ranks": nproc, "backend": "gloo", "link": link, "rates": rates,
            "model": "mlp", "model_args": model_args, "data": "digits (scikit-learn), 15% validation split",
            "steps": steps, "batch_size_per_rank": 32, "compression_start_step": 10, "int8_chunk_size": 256,
        },
        results=results,
    )
    for rate in rates:
        suffix = "" if rate == "loopback" else f"@{rate}"
        fp32 = results[f"fp32{suffix}"]
        for name in contenders:
            if name == "fp32":
                continue
            res, key = results[f"{name}{suffix}"], f"{name}{suffix.replace('@', '_at_')}"
            record.ratios[f"{key}_bytes_vs_fp32"] = res["bytes_per_step"] / fp32["bytes_per_step"]
            record.ratios[f"{key}_accuracy_vs_fp32"] = res["val_accuracy"] / fp32["val_accuracy"]
            record.ratios[f"{key}_speedup_vs_fp32"] = fp32["step_ms"] / res["step_ms"]
    first = "" if rates == ["loopback"] else f"_at_{rates[0]}"
    record.ratios["int8_bytes_vs_fp32"] = record.ratios[f"int8{first}_bytes_vs_fp32"]
    record.ratios["int8_accuracy_vs_fp32"] = record.ratios[f"int8{first}_accuracy_vs_fp32"]
    record.checks["int8_wire_at_most_27pct"] = record.ratios["int8_bytes_vs_fp32"] <= 0.27
    record.checks["int8_keeps_98pct_accuracy"] = record.ratios["int8_accuracy_vs_fp32"] >= 0.98
    if rates == ["loopback"]:
        record.notes.append("loopback: the link is not the bottleneck, so compression costs time here")
    return record
