"""The benchmarks behind `ds bench NAME`: each module's `run(quick, device)` returns a `BenchRecord`.

Modules are imported only when their benchmark runs, so a machine that has only one benchmark's dependencies
(the bare GPU machine of benchmarks/gpu_suite.sh) can still run that benchmark.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from rich.console import Console

from fullchain.errors import UserError

# name -> (module under fullchain.bench, one line for `ds bench --list`)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "trainer-overhead": ("trainer_overhead", "our Trainer against a raw PyTorch loop and Lightning Fabric"),
    "amp": ("amp", "mixed precision (bf16, fp16) against fp32 training"),
    "checkpoint": ("checkpoint", "asynchronous checkpoints against blocking saves and DCP async_save (with stagers)"),
    "comm": ("comm", "compressed and hierarchical gradient all-reduce against fp32 DDP, bytes counted on the wire"),
    "fusion": ("fusion", "graph passes against eager and torch.compile"),
    "realtime": ("realtime", "int8 ONNX Runtime against fp32 ONNX Runtime and eager PyTorch"),
    "gpu-inference": ("gpu_inference", "fp16 and int8 inference: eager PyTorch, ONNX Runtime and TensorRT"),
    "serve": ("serve", "ds serve against a plain FastAPI endpoint and LitServe"),
    "monitor-overhead": ("monitor", "the cost of a scraped metrics endpoint on training, against prometheus_client"),
    "parallel": ("parallel", "DDP vs FSDP2 vs hybrid, the placement planner, static vs balanced data parallelism"),
}


def benchmark_module(name: str) -> ModuleType:
    """Import one benchmark's module (and only its dependencies)."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"fullchain.bench.{BENCHMARKS[name][0]}")


def run_benchmark(
    name: str, quick: bool = False, json_path: Path | None = None, device: str = "auto", console: Console | None = None
):
    from fullchain.bench.harness import print_record, write_record

    module = benchmark_module(name)
    console = console or Console()
    record = module.run(quick=quick, device=device)
    print_record(record, console)
    if json_path is not None:
        write_record(record, json_path)
        console.print(f"written to {json_path}")
    return record
