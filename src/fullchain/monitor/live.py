"""The live terminal view of `ds-monitor`: one row per view with the current value, rolling p50/p95/p99
over the recent points, and a sparkline (rich renders it; the sparkline is eight Unicode block heights)."""

from __future__ import annotations

import math

from rich.table import Table

from fullchain.monitor.rules import Finding
from fullchain.monitor.series import Recorder, rolling_percentiles

BLOCKS = "▁▂▃▄▅▆▇█"
SPARK_POINTS = 40


def sparkline(values: list[float], width: int = SPARK_POINTS) -> str:
    values = [v for v in values[-width:] if math.isfinite(v)]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi == lo:
        return BLOCKS[3] * len(values)
    return "".join(BLOCKS[min(7, int((v - lo) / (hi - lo) * 8))] for v in values)


def fmt(value: float, unit: str = "") -> str:
    if not math.isfinite(value):
        return "–"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "":
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:.1f} {unit}"


def render(recorder: Recorder, endpoint: str, status: str, findings: list[Finding]) -> Table:
    table = Table(title=f"ds-monitor {endpoint}  [dim]{status}[/]", expand=False)
    for column in ("metric", "now", "p50", "p95", "p99", "trend"):
        table.add_column(column, justify="left" if column in ("metric", "trend") else "right")
    for view in recorder.views:
        values = recorder.values(view.key)
        p50, p95, p99 = rolling_percentiles(values[-SPARK_POINTS:])
        table.add_row(view.label, fmt(recorder.latest(view.key), view.unit), fmt(p50, view.unit),
                      fmt(p95, view.unit), fmt(p99, view.unit), sparkline(values) or "[dim]no data[/]")
    if findings:
        table.caption = "top finding: " + findings[0].title
    return table
