"""Side-by-side measurement and the `ds bench` record (../shared/BENCHMARKS.md).

Contenders run alternately (A B A B ...) after a warm-up; each contender reports the median of its
repeats with the spread (min, max); a ratio is computed pair by pair (repeat i of A against repeat i of
B) and its median reported, so slow drift of a shared machine hits both sides alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import fullchain


@dataclass
class BenchRecord:
    """The JSON document `ds bench NAME --json` writes."""

    bench: str
    settings: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ratio_spreads: dict[str, dict[str, float]] = field(default_factory=dict)  # min, max, n of paired ratios

    def add_ratio(self, name: str, rounds: dict[str, list[dict[str, float]]], num: str, den: str, key: str) -> float:
        """`ratios[name]` = median of num[key] / den[key] pair by pair, its spread in `ratio_spreads[name]`."""
        values = paired_ratios(rounds, num, den, key)
        s = spread(values)
        self.ratios[name] = s["median"]
        self.ratio_spreads[name] = {"min": s["min"], "max": s["max"], "n": s["n"]}
        return s["median"]

    def to_json(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "version": fullchain.__version__,
            "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "device": device_name(),
            "cpu": cpu_model(),
            "threads": torch.get_num_threads(),
            "settings": self.settings,
            "results": self.results,
            "ratios": self.ratios,
            "checks": self.checks,
            "ratio_spreads": self.ratio_spreads,
            "notes": self.notes,
        }


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def alternate(
    contenders: dict[str, Callable[[], dict[str, float]]], repeats: int, warmup: int = 1
) -> dict[str, list[dict[str, float]]]:
    """Run each contender `warmup` times, then `repeats` rounds of all contenders; returns each round's measures.

    The order rotates from round to round (A B C, B C A, C A B, ...) so that no contender always runs
    right after the same other one: a state left behind by one (allocator, caches, clock) is shared out.
    """
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    names = list(contenders)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i in range(repeats):
        for name in rotated(names, i):
            rounds[name].append(contenders[name]())
    return rounds


def summarise(rounds: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Median and spread of every numeric measure of every contender."""
    results: dict[str, dict[str, Any]] = {}
    for name, measures in rounds.items():
        results[name] = {}
        for key in measures[0]:
            values = [m[key] for m in measures]
            s = spread(values)
            results[name][key] = s["median"]
            results[name][f"{key}_min"] = s["min"]
            results[name][f"{key}_max"] = s["max"]
    return results


def paired_ratios(rounds: dict[str, list[dict[str, float]]], num: str, den: str, key: str) -> list[float]:
    """num[key] / den[key] of each repeat, pair by pair."""
    return [a[key] / b[key] for a, b in zip(rounds[num], rounds[den], strict=True)]


def paired_ratio(rounds: dict[str, list[dict[str, float]]], num: str, den: str, key: str) -> float:
    """Median over repeats of num[key] / den[key], pair by pair."""
    return statistics.median(paired_ratios(rounds, num, den, key))


def rotated(names: list[str], round_index: int) -> list[str]:
    """The order of round `round_index`: A B C, B C A, C A B, ... (see `alternate`)."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def print_record(record: BenchRecord, console: Console) -> None:
    table = Table(title=f"ds bench {record.bench}")
    table.add_column("contender")
    keys = [k for k in next(iter(record.results.values()), {}) if not k.endswith(("_min", "_max"))]
    for key in keys:
        table.add_column(key, justify="right")
    other_rows = {}
    for name, res in record.results.items():
        if not any(key in res for key in keys):  # a measurement of another shape: listed below the table
            other_rows[name] = res
            continue
        cells = []
        for key in keys:
            value = res.get(key)
            if isinstance(value, float):
                lo, hi = res.get(f"{key}_min"), res.get(f"{key}_max")
                cell = f"{value:.4g}" + (f" [{lo:.4g}..{hi:.4g}]" if lo is not None and lo != hi else "")
            else:
                cell = str(value)
            cells.append(cell)
        table.add_row(name, *cells)
    console.print(table)
    for name, res in other_rows.items():
        console.print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in res.items()))
    for name, value in record.ratios.items():
        lo_hi = record.ratio_spreads.get(name)
        spread_text = f" [{lo_hi['min']:.4g}..{lo_hi['max']:.4g}, n={lo_hi['n']}]" if lo_hi else ""
        console.print(f"ratio  {name} = {value:.4f}{spread_text}")
    for name, ok in record.checks.items():
        console.print(f"check  {name}: {'[green]yes[/]' if ok else '[red]no[/]'}")
    for note in record.notes:
        console.print(f"note   {note}")


def write_record(record: BenchRecord, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record.to_json(), indent=2) + "\n")
