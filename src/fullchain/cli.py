"""The `ds` command: parses arguments, calls one stage function, maps user errors to exit code 2.

Each command is thin: the work lives in `fullchain.pipeline`, `fullchain.evaluate` and `fullchain.bench`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fullchain import __version__
from fullchain.errors import TrainingStopped, UserError, report

app = typer.Typer(
    name="ds",
    help="fullchain: train, optimise, deploy and watch PyTorch models from one YAML file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect run files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
logs_app = typer.Typer(help="Read a run's logs.", no_args_is_help=True)
app.add_typer(logs_app, name="logs")

out = Console()

ConfigPath = Annotated[Path, typer.Argument(help="run file (YAML)", show_default=False)]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a field, e.g. --set train.max_steps=50 (repeatable)"),
]


def _load(config: Path, overrides: list[str] | None):
    from fullchain.config import load_config

    return load_config(config, overrides or [])


def _version(value: bool) -> None:
    if value:
        out.print(f"fullchain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """fullchain: train, optimise, deploy and watch PyTorch models from one YAML file."""


@app.command()
def train(
    config: ConfigPath,
    overrides: Overrides = None,
    resume: Annotated[
        str | None, typer.Option(help="auto (newest valid checkpoint) or a checkpoint directory")
    ] = None,
    nproc_per_node: Annotated[int, typer.Option(min=1, help="processes per machine (via torchrun)")] = 1,
    nnodes: Annotated[int, typer.Option(min=1, help="machines taking part")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="this machine's index")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT of the rendezvous (several machines)")] = None,
    max_restarts: Annotated[int, typer.Option(min=0, help="restarts of the group after a failed worker")] = 0,
    local_addr: Annotated[str | None, typer.Option(help="this machine's address as the others reach it")] = None,
) -> None:
    """Train the model a run file describes; writes runs/<name>/ with metrics, checkpoints and the model."""
    cfg = _load(config, overrides)  # validate before launching anything
    if nproc_per_node > 1 or nnodes > 1 or max_restarts > 0:
        from fullchain.distributed.launch import launch

        code = launch(config, overrides or [], resume, nproc_per_node=nproc_per_node, nnodes=nnodes,
                      node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, max_restarts=max_restarts,
                      local_addr=local_addr)
        if code != 0:
            raise typer.Exit(code)
        out.print(f"distributed training finished; model written to {cfg.run_dir / 'model'}")
        return
    from fullchain.pipeline import train_stage

    outcome = train_stage(cfg, resume=resume)
    r = outcome.result
    out.print(
        f"trained {r.steps} steps in {r.wall_s:.1f}s ({r.samples_per_s:.0f} samples/s); "
        f"model written to {outcome.model_dir}"
    )


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="model artifact directory (runs/<name>/model)")],
    data: Annotated[str | None, typer.Option(help="dataset name or a .csv/.jsonl/.npz file or image folder")] = None,
    split: Annotated[str | None, typer.Option(help="train, val, test or all")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the metrics to this JSON file")] = None,
) -> None:
    """Score a model artifact: accuracy, macro-F1 and the confusion matrix."""
    from fullchain.evaluate import evaluate_artifact

    metrics = evaluate_artifact(model_dir, data=data, split=split, batch_size=batch_size)
    _print_eval(metrics)
    if json_out is not None:
        json_out.write_text(json.dumps(metrics, indent=2) + "\n")


def _print_eval(metrics: dict) -> None:
    headline = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    out.print(f"[bold]{metrics['split']}[/] " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in headline.items()))
    if "confusion_matrix" in metrics:
        names = metrics["label_names"]
        table = Table(title="confusion matrix (rows: true, columns: predicted)")
        table.add_column("")
        for name in names:
            table.add_column(name[:12], justify="right")
        for name, row in zip(names, metrics["confusion_matrix"], strict=True):
            table.add_row(name[:12], *(str(v) for v in row))
        out.print(table)


@app.command()
def run(config: ConfigPath, overrides: Overrides = None) -> None:
    """The main job: every stage of the run file in order; writes runs/<name>/summary.json."""
    from fullchain.pipeline import run_pipeline

    cfg = _load(config, overrides)
    summary = run_pipeline(cfg)
    out.print_json(json.dumps(summary))
    out.print(f"summary written to {cfg.run_dir / 'summary.json'}")


@app.command()
def bench(
    name: Annotated[str | None, typer.Argument(help="benchmark name; omit with --list")] = None,
    quick: Annotated[bool, typer.Option(help="a small setting that runs in seconds (for tests)")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results to this JSON file")] = None,
    list_: Annotated[bool, typer.Option("--list", help="list the benchmarks")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Run one benchmark side by side against its peer; prints a table, --json writes the record."""
    from fullchain.bench import BENCHMARKS, run_benchmark

    if list_ or name is None:
        for bench_name, module in BENCHMARKS.items():
            out.print(f"{bench_name:20s} {module.__doc__.strip().splitlines()[0]}")
        return
    wide = out if out.is_terminal else Console(width=160)  # logs keep whole table cells
    run_benchmark(name, quick=quick, json_path=json_out, device=device, console=wide)


@config_app.command("show")
def config_show(config: ConfigPath, overrides: Overrides = None) -> None:
    """Print the resolved run file: defaults filled in, overrides applied, validated."""
    from fullchain.config import dump_config

    out.print(dump_config(_load(config, overrides)), end="", highlight=False)


@app.command()
def profile(
    config: ConfigPath,
    overrides: Overrides = None,
    steps: Annotated[int, typer.Option(min=1, help="training steps to profile (after 5 warm-up steps)")] = 20,
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: runs/<name>/profile")] = None,
) -> None:
    """Profile a few training steps: data/forward/backward/optimiser/comm split, top operators, Chrome trace."""
    from fullchain.monitor.cli import print_findings
    from fullchain.monitor.profile import profile_run
    from fullchain.monitor.report import write_report

    cfg = _load(config, overrides)
    out_dir = out_dir or cfg.run_dir / "profile"
    result, report = profile_run(cfg, steps, out_dir)
    table = Table(title=f"{steps} steps, {1000 * result.step_seconds / steps:.1f} ms per step")
    for column in ("phase", "ms per step", "share"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase, share in result.shares().items():
        table.add_row(phase, f"{1000 * result.seconds[phase] / steps:.2f}", f"{share:.1%}")
    out.print(table)
    for op in result.top_ops[:5]:
        out.print(f"  {op['op']:40s} {op['self_ms']:9.2f} ms self, {op['calls']} calls", highlight=False)
    print_findings(out, report.findings)
    html_path, _ = write_report(report, out_dir / "report.html")
    out.print(f"trace: {result.trace}; report: {html_path}")


@logs_app.command("analyze")
def logs_analyze(
    run_dir: Annotated[Path, typer.Argument(help="run directory (runs/<name>)")],
    report: Annotated[Path | None, typer.Option(help="also write an HTML report (JSON next to it)")] = None,
) -> None:
    """Find loss spikes, NaN, throughput drops, restarts and slow checkpoints in a run's metrics.jsonl."""
    from fullchain.monitor.cli import print_findings
    from fullchain.monitor.logs import analyze_run
    from fullchain.monitor.report import write_report

    result = analyze_run(run_dir)
    for table in result.tables:
        for name, value in table.rows:
            out.print(f"{name:32s} {value:.4g}" if isinstance(value, float) else f"{name:32s} {value}")
    print_findings(out, result.findings)
    if report is not None:
        html_path, json_path = write_report(result, report)
        out.print(f"report written to {html_path} and {json_path}")


def main() -> None:
    try:
        app(prog_name="ds")
    except UserError as exc:
        report(exc)
        sys.exit(exc.exit_code)
    except TrainingStopped as exc:
        report(exc, style="bold yellow", prefix="")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
