"""The benchmarks behind `ds bench NAME`: each module's `run(quick, device)` returns a `BenchRecord`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from fullchain.bench import amp, checkpoint, comm, fusion, monitor, realtime, serve, trainer_overhead
from fullchain.bench.harness import BenchRecord, print_record, write_record
from fullchain.errors import UserError

BENCHMARKS = {
    "trainer-overhead": trainer_overhead,
    "amp": amp,
    "checkpoint": checkpoint,
    "comm": comm,
    "fusion": fusion,
    "realtime": realtime,
    "serve": serve,
    "monitor-overhead": monitor,
}


def run_benchmark(
    name: str, quick: bool = False, json_path: Path | None = None, device: str = "auto", console: Console | None = None
) -> BenchRecord:
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    console = console or Console()
    record = BENCHMARKS[name].run(quick=quick, device=device)
    print_record(record, console)
    if json_path is not None:
        write_record(record, json_path)
        console.print(f"written to {json_path}")
    return record
