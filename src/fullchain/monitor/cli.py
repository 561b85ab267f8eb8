"""`ds-monitor`: watch a `ds serve` or a training run's ``/metrics``, diagnose bottlenecks, write the report.

Scrapes every `--interval` seconds until `--duration` or Ctrl-C, shows the live view, then writes the
report (HTML + JSON) and prints the findings. An endpoint that does not answer is retried at every interval
with a one-line message; the exit code is 1 only when the endpoint never answered.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fullchain import metric_names as M
from fullchain.bearer import read_token
from fullchain.errors import UserError
from fullchain.monitor.live import render
from fullchain.monitor.report import Plot, Report, write_report
from fullchain.monitor.report import Table as ReportTable
from fullchain.monitor.rules import Finding, diagnose
from fullchain.monitor.scrape import Scraper
from fullchain.monitor.series import GROUPS, Recorder, histogram_delta, observation_facts, views_for
from fullchain.monitor.variants import variant_table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)


def parse_groups(metrics: str) -> list[str]:
    groups = [g.strip() for g in metrics.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise typer.BadParameter(f"unknown metric group(s) {', '.join(unknown) or '(none)'}; "
                                 f"choose from {', '.join(GROUPS)}", param_hint="--metrics")
    return groups


def print_findings(console: Console, findings: list[Finding]) -> None:
    if not findings:
        console.print("[green]no bottleneck above the thresholds[/]")
    for rank, f in enumerate(findings, 1):
        console.print(f"[bold]{rank}. {f.title}[/] (impact {f.impact:.0%})")
        for e in f.evidence:
            console.print(f"   evidence: {e.text()}")
        console.print(f"   action: {f.action}")


def build_report(recorder: Recorder, source: str) -> Report:
    snaps = recorder.snapshots
    facts = observation_facts(snaps)
    first = snaps[0] if len(snaps) > 1 else None
    histograms = [(title, histogram_delta(first, snaps[-1], name)) for title, name in
                  (("request latency", M.SERVE_REQUEST_SECONDS), ("training step time", M.TRAIN_STEP_SECONDS))]
    plots = [Plot(v.key, v.label, v.unit, recorder.points[v.key]) for v in recorder.views]
    notes = [f"{len(snaps)} scrapes over {snaps[-1].t - snaps[0].t:.1f} s; diagnosis uses every series the "
             "endpoint exposes, the plots show the groups chosen with --metrics"]
    ab = variant_table(snaps[0], snaps[-1]) if len(snaps) > 1 else None
    return Report(f"ds-monitor report: {source}", source, diagnose(facts), facts, plots,
                  [(t, h) for t, h in histograms if h.count > 0], tables=[ab] if ab else [], notes=notes)


def print_tables(console: Console, tables: list[ReportTable]) -> None:
    for t in tables:
        table = Table(title=t.title)
        for column in t.header:
            table.add_column(column, justify="left" if column == "variant" else "right")
        for row in t.rows:
            table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row))
        console.print(table)


@app.command()
def monitor(
    endpoint: Annotated[str, typer.Option(help="HOST:PORT (or URL) serving Prometheus /metrics")] = "localhost:8080",
    metrics: Annotated[str, typer.Option(help=f"groups to show: {','.join(GROUPS)}")] = "latency,throughput",
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between scrapes")] = 1.0,
    duration: Annotated[float | None, typer.Option(min=0.1, help="stop after this many seconds (default: Ctrl-C)")]
    = None,
    window: Annotated[float, typer.Option(min=0.5, help="seconds of history behind each live figure")] = 10.0,
    report: Annotated[Path | None, typer.Option(help="write the report here (HTML; JSON next to it)")] = None,
    token_file: Annotated[Path | None, typer.Option(help="a file holding the bearer token of a `ds serve "
                                                          "--token-file` server")] = None,
) -> None:
    """Watch a metrics endpoint live, find the bottleneck, write an optimisation report."""
    recorder = Recorder(views_for(parse_groups(metrics)), window_s=window)
    try:
        scraper = Scraper(endpoint, token=read_token(token_file))
    except UserError as exc:
        err.print(f"error: {exc}", highlight=False)
        raise typer.Exit(2) from None
    started = time.monotonic()
    status, failures = "starting", 0
    live_console = Console(stderr=True)
    try:
        with Live(console=live_console, refresh_per_second=4, transient=False) as live:
            while duration is None or time.monotonic() - started < duration:
                tick = time.monotonic()
                try:
                    recorder.add(scraper.scrape())
                    status = f"{len(recorder.snapshots)} scrapes"
                except (httpx.HTTPError, ValueError) as exc:
                    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
                        refused = "refused the token" if token_file else "needs a bearer token: give --token-file FILE"
                        err.print(f"error: {scraper.url} {refused}", highlight=False)
                        raise typer.Exit(2) from None
                    failures += 1
                    status = f"cannot reach {scraper.url} ({type(exc).__name__}: {exc}); retry {failures}, " \
                             f"every {interval:g}s"
                    if failures == 1 or failures % 10 == 0:
                        err.print(f"[yellow]{status}[/]")
                findings = diagnose(observation_facts(recorder.snapshots)) if recorder.snapshots else []
                live.update(render(recorder, scraper.url, status, findings))
                time.sleep(max(0.0, interval - (time.monotonic() - tick)))
    except KeyboardInterrupt:
        err.print("stopped")
    finally:
        scraper.close()
    if not recorder.snapshots:
        err.print(f"[bold red]never reached {scraper.url}[/] after {failures} attempt(s): is the server running "
                  "and serving /metrics? (ds serve, or a training run with monitor.port set)")
        raise typer.Exit(1)
    result = build_report(recorder, scraper.url)
    print_tables(Console(), result.tables)
    print_findings(Console(), result.findings)
    if report is not None:
        html_path, json_path = write_report(result, report)
        Console().print(f"report written to {html_path} and {json_path}")


def main() -> None:
    try:
        app(prog_name="ds-monitor")
    except KeyboardInterrupt:
        sys.exit(130)
