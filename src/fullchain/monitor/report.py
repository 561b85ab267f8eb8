"""The optimisation report: findings first, then the evidence as plots and tables; HTML (plots embedded as
PNG, one self-contained file) and JSON (the same content as data, for scripts and CI).

Plots are matplotlib (Agg backend, no display needed). The monitor, the profiler and the log analyser all
fill one `Report` and call `write_report`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fullchain.monitor.rules import THRESHOLDS, Finding
from fullchain.monitor.series import HistogramDelta


@dataclass
class Plot:
    key: str
    label: str
    unit: str
    points: list[tuple[float, float]]
    xlabel: str = "seconds"


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Any]]


@dataclass
class Report:
    title: str
    source: str
    findings: list[Finding]
    facts: dict[str, Any] = field(default_factory=dict)
    plots: list[Plot] = field(default_factory=list)
    histograms: list[tuple[str, HistogramDelta]] = field(default_factory=list)
    bars: list[tuple[str, dict[str, float]]] = field(default_factory=list)  # title -> {part: seconds}
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "source": self.source,
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "findings": [f.to_dict() for f in self.findings],
            "thresholds": {k: {"value": v, "meaning": m} for k, (v, m) in THRESHOLDS.items()},
            "facts": {k: _json_number(v) for k, v in self.facts.items()},
            "series": {p.key: {"label": p.label, "unit": p.unit, "points": p.points} for p in self.plots},
            "histograms": {title: {"buckets": [[_json_number(b), c] for b, c in h.buckets], "count": h.count,
                                   "sum": h.sum} for title, h in self.histograms},
            "bars": dict(self.bars),
            "tables": [{"title": t.title, "header": t.header, "rows": t.rows} for t in self.tables],
            "notes": self.notes,
        }


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    return value


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(width: float = 7, height: float = 2.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def plot_series(plot: Plot) -> str:
    fig, ax = _figure()
    ts, vs = zip(*plot.points, strict=True)
    ax.plot(ts, vs, marker=".", linewidth=1.5)
    ax.set_title(plot.label + (f" ({plot.unit})" if plot.unit else ""))
    ax.set_xlabel(plot.xlabel)
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_histogram(title: str, hist: HistogramDelta) -> str:
    """Bucket counts (not cumulative) against each bucket's upper bound."""
    fig, ax = _figure()
    labels, counts, previous = [], [], 0.0
    for bound, cumulative in hist.buckets:
        labels.append("+Inf" if math.isinf(bound) else f"{bound:g}")
        counts.append(cumulative - previous)
        previous = cumulative
    ax.bar(range(len(counts)), counts)
    ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    ax.set_title(f"{title} (count per bucket, upper bound in s)")
    return _png(fig)


def plot_bars(title: str, parts: dict[str, float]) -> str:
    fig, ax = _figure(7, 0.6 + 0.35 * len(parts))
    ax.barh(list(parts), list(parts.values()))
    ax.invert_yaxis()
    ax.set_title(title)
    return _png(fig)


def _img(b64: str, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


CSS = """body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccd;padding:.2em .6em;text-align:left}
.finding{border-left:4px solid #c33;padding:.3em 1em;margin:1em 0;background:#fbf4f4}
.none{border-left:4px solid #3a3;padding:.3em 1em;background:#f3faf3}.plot{max-width:100%}code{background:#eef}"""


def render_html(report: Report) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(report.title)}</h1>",
             f"<p>source: <code>{html.escape(report.source)}</code></p>",
             '<section id="findings"><h2>Findings</h2>']
    if not report.findings:
        parts.append('<div class="none">No rule fired: no bottleneck above the thresholds below.</div>')
    for rank, f in enumerate(report.findings, 1):
        evidence = "".join(f"<li>{html.escape(e.text())}</li>" for e in f.evidence)
        settings = ", ".join(f"{k}: {v}" for k, v in f.settings.items())
        parts.append(
            f'<div class="finding"><h3>{rank}. {html.escape(f.title)}</h3>'
            f"<p>expected impact: {f.impact:.0%} of the time at stake (rule <code>{f.rule}</code>)</p>"
            f"<ul>{evidence}</ul><p><b>Action:</b> {html.escape(f.action)}</p>"
            + (f"<p>settings: <code>{html.escape(settings)}</code></p>" if settings else "")
            + (f"<p>command: <code>{html.escape(f.command)}</code></p>" if f.command else "") + "</div>")
    parts.append("</section>")
    for note in report.notes:
        parts.append(f"<p>{html.escape(note)}</p>")
    if report.plots or report.histograms or report.bars:
        parts.append('<section id="plots"><h2>Plots</h2>')
        parts += [_img(plot_series(p), p.label) for p in report.plots if p.points]
        parts += [_img(plot_histogram(t, h), t) for t, h in report.histograms if h.count > 0]
        parts += [_img(plot_bars(t, b), t) for t, b in report.bars if b]
        parts.append("</section>")
    for t in report.tables:
        parts.append(f"<h2>{html.escape(t.title)}</h2>{_table(t.header, t.rows)}")
    facts = [[k, v] for k, v in report.facts.items()
             if not isinstance(v, list) and not (isinstance(v, float) and math.isnan(v))]  # NaN: not exposed
    parts.append(f"<h2>Observed figures</h2>{_table(['fact', 'value'], facts)}")
    parts.append("<h2>Thresholds</h2>" + _table(["name", "value", "meaning"],
                                                 [[k, v, m] for k, (v, m) in THRESHOLDS.items()]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: Report, html_path: Path) -> tuple[Path, Path]:
    """Writes FILE.html and FILE.json next to it; returns both paths."""
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(report), encoding="utf-8")
    json_path = html_path.with_suffix(".json")
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return html_path, json_path
