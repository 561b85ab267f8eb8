"""Gradient communication (C5, C6): bytes per step, step time and accuracy of each compression setting.

Every contender is a real `ds train --nproc-per-node N` run (torchrun, gloo) of the same model, data order
and seed; only `distributed.compression` / `distributed.hierarchical` differ. fp32 and int8 each run flat and
hierarchical, so compression and hierarchy show as separate effects. Contenders run in rounds, alternating in
a rotating order; each figure is the median over rounds with its spread, ratios paired round by round.
Bytes are counted, not computed: `bytes_per_step` is what rank 0's TCP connections sent per step after the
warm-up, as the kernel counts it (TCP_INFO, `comm_wire_bytes_total` in metrics.jsonl), for fp32's native
all-reduce as for every hook; the hook's own count sits beside it. Accuracy is the last evaluation on the
held-out validation split. On loopback the link is not the bottleneck, so compression costs time here
instead of saving it. The full run therefore runs on the emulated cluster (fullchain.distributed.emulated_cluster:
2 network-namespace nodes x 2 ranks, each node's link limited by tc tbf to 1 Gbit/s, then 100 Mbit/s); node 0 also
reads the bytes its link carried from the kernel's veth counter.
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

from fullchain import metric_names as M
from fullchain.bench.harness import BenchRecord, alternate, summarise
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


def _read_metrics(root: Path, name: str) -> dict[str, float]:
    rows = [json.loads(x) for x in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if M.COMM_WIRE_BYTES_TOTAL in r]
    if not train:
        raise UserError(f"comm bench: {name} logged no {M.COMM_WIRE_BYTES_TOTAL} (no TCP_INFO bytes from the kernel)")
    after_warmup = [r for r in train if r["step"] >= 20]
    first, last = after_warmup[0], after_warmup[-1]
    steps_between = last["step"] - first["step"]

    def per_step(key: str) -> float:
        return (last[key] - first[key]) / steps_between

    measured = {
        "bytes_per_step": per_step(M.COMM_WIRE_BYTES_TOTAL),
        "hook_bytes_per_step": per_step("comm_bytes_total"),
        "step_ms": 1000 * (last["time"] - first["time"]) / steps_between,
        "val_accuracy": [r for r in rows if "eval_accuracy" in r][-1]["eval_accuracy"],
    }
    # native DDP (fp32) overlaps its all-reduce with backward and has no hook to time it: no comm time
    for key, name_ in (("comm_seconds_total", "comm_s_per_step"), ("comm_inter_node_bytes_total",
                                                                   "inter_node_bytes_per_step")):
        if key in last:
            measured[name_] = per_step(key)
    return measured


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


HIERARCHY = {"hierarchical": True, "topology": {"procs_per_node": 2}}


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    contenders = {"fp32": {"compression": "none"}, "int8": {"compression": "int8"}}
    if not quick:
        contenders.update({
            "fp16": {"compression": "fp16"},
            "bf16": {"compression": "bf16"},
            "powersgd": {"compression": "powersgd"},
            "fp32_hierarchical": {"compression": "none", **HIERARCHY},
            "int8_hierarchical": {"compression": "int8", **HIERARCHY},
        })
    repeats = 2 if quick else 3
    unavailable = None if quick else cluster.available()
    rounds: dict[str, list[dict]] = {}
    runs = iter(range(10**6))  # each run gets a directory and a port of its own
    with tempfile.TemporaryDirectory(prefix="fullchain-comm-bench-") as tmp:
        root = Path(tmp)
        if quick or unavailable:
            model_args = {"hidden": [512, 512], "dropout": 0.0}
            steps, nproc, rates = (60, 2, ["loopback"]) if quick else (60, 4, ["loopback"])
            link = "loopback" if quick else f"loopback (emulated cluster unavailable: {unavailable})"

            def local(name: str, cfg: dict):
                return lambda: _run_local(root / f"run{next(runs)}", name, nproc, steps, cfg, model_args)

            rounds = alternate({name: local(name, cfg) for name, cfg in contenders.items()}, repeats, warmup=0)
        else:
            model_args = {"hidden": [1024, 1024], "dropout": 0.0}
            steps, nproc, rates = 50, 4, ["1gbit", "100mbit"]
            link = "emulated cluster: 2 network-namespace nodes x 2 ranks, each node's link limited by tc tbf"

            def emulated(name: str, cfg: dict, rate: str):
                def one():
                    i = next(runs)
                    return _run_emulated(root / rate / f"run{i}", name, steps, cfg, model_args, port=29400 + i % 500)
                return one

            try:
                for rate in rates:
                    cluster.up(2, rate)
                    by_rate = alternate({name: emulated(name, cfg, rate) for name, cfg in contenders.items()},
                                        repeats, warmup=0)
                    rounds.update({f"{name}@{rate}": r for name, r in by_rate.items()})
                    cluster.down()
            finally:
                cluster.down()
    record = BenchRecord(
        bench="comm",
        settings={
            "quick": quick, "ranks": nproc, "backend": "gloo", "link": link, "rates": rates, "repeats": repeats,
            "order": "contenders alternate, rotating order each round; figures are medians over rounds",
            "bytes": "bytes_per_step: rank 0's TCP bytes sent per step (kernel TCP_INFO) after step 20; "
                     "hook_bytes_per_step: the hook's own count (fp32: the ring volume, computed)",
            "model": "mlp", "model_args": model_args, "data": "digits (scikit-learn), 15% validation split",
            "steps": steps, "batch_size_per_rank": 32, "compression_start_step": 10, "int8_chunk_size": 256,
        },
        results=summarise(rounds),
    )
    for rate in rates:
        suffix = "" if rate == "loopback" else f"@{rate}"
        for name in contenders:
            # int8_hierarchical also against fp32_hierarchical: compression alone, hierarchy held fixed
            bases = ["fp32"] + (["fp32_hierarchical"] if name == "int8_hierarchical" else [])
            for base in bases if name != "fp32" else []:
                key, num, den = f"{name}{suffix.replace('@', '_at_')}", f"{name}{suffix}", f"{base}{suffix}"
                record.add_ratio(f"{key}_bytes_vs_{base}", rounds, num, den, "bytes_per_step")
                record.add_ratio(f"{key}_accuracy_vs_{base}", rounds, num, den, "val_accuracy")
                record.add_ratio(f"{key}_speedup_vs_{base}", rounds, den, num, "step_ms")
    first = "" if rates == ["loopback"] else f"_at_{rates[0]}"
    for headline in ("bytes", "accuracy"):
        record.ratios[f"int8_{headline}_vs_fp32"] = record.ratios[f"int8{first}_{headline}_vs_fp32"]
        record.ratio_spreads[f"int8_{headline}_vs_fp32"] = record.ratio_spreads[f"int8{first}_{headline}_vs_fp32"]
    record.checks["bytes_counted_on_the_wire"] = all(r["bytes_per_step"] > 0 for rs in rounds.values() for r in rs)
    record.checks["int8_wire_at_most_27pct"] = record.ratios["int8_bytes_vs_fp32"] <= 0.27
    record.checks["int8_keeps_98pct_accuracy"] = record.ratios["int8_accuracy_vs_fp32"] >= 0.98
    if rates == ["loopback"]:
        record.notes.append("loopback: the link is not the bottleneck, so compression costs time here")
    return record
