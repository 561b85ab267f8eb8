"""The report stage of `ds run`: ``runs/<name>/report.html`` (+ ``.json``) from the run's files.

The log analyser's findings and plots over ``metrics.jsonl``, plus a table of the test figures the evaluate
stage recorded in ``summary.json`` beside the baseline it measured on the same split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fullchain.monitor.logs import analyze_run
from fullchain.monitor.report import Table, write_report


def evaluation_table(summary: dict[str, Any]) -> Table | None:
    evaluation = summary.get("eval") or {}
    rows = [[name, figures.get("accuracy"), figures.get("macro_f1")]
            for name, figures in [("model", evaluation), *evaluation.get("baselines", {}).items()]
            if "accuracy" in figures]
    if not rows:
        return None
    return Table(f"Test split ({evaluation.get('n')} samples)", ["contender", "accuracy", "macro-F1"], rows)


def report_stage(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    report = analyze_run(run_dir)
    if (table := evaluation_table(summary)) is not None:
        report.tables.insert(0, table)
    html_path, _ = write_report(report, run_dir / "report.html")
    return {"report": str(html_path), "findings": [f.title for f in report.findings]}
