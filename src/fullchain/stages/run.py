"""`ds run`: every stage of a run file in order, each reading the files the one before it wrote.

train -> evaluate -> optimize (when enabled) -> export -> serve -> report. Export and serve take the newest
good artifact: the optimised one when the optimise stage ran and succeeded, else the trained one. A stage
after training that fails (say, graph capture of data-dependent control flow) is recorded in
``summary.json`` with its message and a hint, the remaining stages run on the last good artifact, and the
command exits 1 naming the failed stage (`RunResult.failed`). Training itself failing stops the run: there is
no artifact to go on with.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fullchain.config import RunConfig
from fullchain.errors import UserError, one_line
from fullchain.stages.evaluate import evaluate_artifact, text_baselines
from fullchain.stages.report import report_stage
from fullchain.stages.train import train_stage

console = Console(stderr=True)
OPTIMIZED_DIR = "model-optimized"


@dataclass
class RunResult:
    summary: dict[str, Any]
    failed: list[str] = field(default_factory=list)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def _attempt(result: RunResult, name: str, stage: Callable[[], dict[str, Any]], fallback: Path) -> bool:
    """Run one stage into the summary; a failure is recorded (message and hint), printed, and the run goes on."""
    try:
        result.summary[name] = {"status": "ok", **stage()}
        return True
    except Exception as exc:  # noqa: BLE001 - any stage failure is reported, the later stages still run
        if not isinstance(exc, UserError):  # a fullchain bug: keep its traceback in view
            console.print(traceback.format_exc(), highlight=False, soft_wrap=True)
        result.failed.append(name)
        result.summary[name] = {"status": "failed", "error": one_line(exc) if not isinstance(exc, UserError)
                                else str(exc), "hint": f"the stages after {name} ran on {fallback}"}
        console.print(f"[bold red]{name} stage failed:[/] {result.summary[name]['error']}; "
                      f"continuing with {fallback}", highlight=False, soft_wrap=True)
        return False


def run_pipeline(cfg: RunConfig) -> RunResult:
    """`ds run`: every stage in order; returns (and writes) the summary and the stages that failed."""
    from fullchain.stages.export import export_stage
    from fullchain.stages.optimize import optimize_artifact, summarize
    from fullchain.stages.serve import serve_stage

    started = time.perf_counter()
    outcome = train_stage(cfg)
    trust_code = cfg.model.target is not None  # the run file's own model code wrote this artifact
    artifact = outcome.model_dir
    result = RunResult({"name": cfg.name, "model_dir": str(artifact),
                        "train": {**outcome.result.summary(), "parameters": outcome.parameters}})

    def evaluate() -> dict[str, Any]:
        metrics = evaluate_artifact(artifact, split="test", bundle=outcome.bundle, trust_code=trust_code)
        return {**{k: v for k, v in metrics.items() if k != "confusion_matrix"},
                "baselines": text_baselines(outcome.bundle)}

    _attempt(result, "eval", evaluate, artifact)
    if cfg.optimize.enabled:
        optimized = cfg.run_dir / OPTIMIZED_DIR

        def optimize() -> dict[str, Any]:
            report = optimize_artifact(artifact, optimized, cfg.optimize, console=console, bundle=outcome.bundle,
                                       trust_code=trust_code)
            return {"model_dir": str(optimized), **summarize(report)}

        if _attempt(result, "optimize", optimize, artifact):
            artifact = optimized
    if cfg.export.enabled:
        _attempt(result, "export", lambda: export_stage(cfg, artifact, console), artifact)
    if cfg.serve.enabled:
        _attempt(result, "serve", lambda: serve_stage(cfg, artifact, console), artifact)
    result.summary["deployed_model_dir"] = str(artifact)
    _attempt(result, "monitor", lambda: report_stage(cfg.run_dir, result.summary), artifact)
    result.summary["failed_stages"] = result.failed
    result.summary["wall_s"] = round(time.perf_counter() - started, 2)
    write_summary(cfg.run_dir, result.summary)
    return result
