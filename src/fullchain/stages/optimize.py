"""`ds optimize`: a model artifact in, an optimised artifact and ``optimize_report.json`` out.

Order: graph passes (checked for parity one by one, see `manager`) -> inference precision (checked
against fp32 with the dtype's tolerance; rolled back with a warning if it fails) -> optional
``torch.compile`` (recorded in the recipe, applied when the artifact is loaded). Quantisation
(``--quantize``) is its own path in `fullchain.optimize.quantize`, which starts from the fp32
artifact. The written artifact is loaded back the way every later stage loads it and checked
once more against the original, so what the report measures is what `ds serve` will run.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fullchain.artifact import META, ArtifactMeta, load_artifact, read_meta, save_variant
from fullchain.config import OptimizeConfig
from fullchain.errors import UserError
from fullchain.optimize.manager import PassManager, PassRolledBack
from fullchain.optimize.measure import latency_samples, median_ms, peak_memory_bytes
from fullchain.optimize.parity import compare
from fullchain.optimize.recipe import DTYPES, InferencePrecision
from fullchain.tasks import Task

REPORT = "optimize_report.json"
LATENCY_BATCHES = (1, 8)


def _measure(model: torch.nn.Module, task: Task, repeats: int) -> dict[str, Any]:
    """Median latency at batch 1 and 8 and peak memory at batch 8, at the model's full input length."""
    length = getattr(task, "max_length", None)
    figures: dict[str, Any] = {}
    with torch.inference_mode():
        for batch in LATENCY_BATCHES:
            xs = task.example_inputs(batch, length=length, seed=batch)
            call = lambda xs=xs: model(*xs)  # noqa: E731
            figures[f"latency_ms_batch{batch}"] = round(median_ms(latency_samples(call, repeats)), 3)
        figures["peak_memory_bytes_batch8"] = peak_memory_bytes(call)
    return figures


def _check_source(model_dir: Path, spec: ArtifactMeta) -> None:
    if spec.extra.get("optimize"):
        raise UserError(f"{model_dir}: already optimised ({META} has extra.optimize); optimise the original artifact")


def optimize_artifact(
    model_dir: str | Path,
    out_dir: str | Path,
    settings: OptimizeConfig,
    console: Console | None = None,
    evaluate: bool = True,
    bundle: Any = None,
    repeats: int = 10,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Optimise the artifact in ``model_dir`` into ``out_dir``; returns (and writes) the report."""
    console = console or Console(stderr=True)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise UserError(f"--out {out_dir}: must differ from the model directory (the original is kept)")
    _check_source(model_dir, read_meta(model_dir))
    if settings.quantize != "none":  # quantisation loads the fp32 model itself
        from fullchain.stages.quantize import quantize_artifact

        section = quantize_artifact(model_dir, out_dir, settings, console, bundle=bundle, trust_code=trust_code)
        report = {"source": str(model_dir), "quantize": section}
        (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        return report

    model, spec = load_artifact(model_dir, trust_code=trust_code)
    task = spec.make_task()
    parity_inputs = task.example_inputs(3, length=min(getattr(task, "max_length", 64) or 64, 64))
    with torch.no_grad():
        reference = model(*parity_inputs)
    report: dict[str, Any] = {"source": str(model_dir), "out": str(out_dir), "settings": settings.model_dump()}

    with console.status("applying graph passes"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PassRolledBack)
        optimized, outcomes = PassManager(settings.passes).run(model, parity_inputs)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    report["passes"] = [o.to_json() for o in outcomes]
    applied = [o.name for o in outcomes if o.status == "applied"]

    precision = settings.precision
    if precision != "fp32":
        lowered = InferencePrecision(optimized.to(DTYPES[precision]), DTYPES[precision])
        with torch.no_grad():
            parity = compare(lowered(*parity_inputs), reference, DTYPES[precision])
        report["precision_parity"] = parity.to_json()
        if not parity.ok:
            console.print(f"[yellow]warning:[/] {precision} rolled back: max abs error {parity.max_abs:.3g} "
                          f"exceeds the {precision} tolerance; the artifact stays fp32")
            optimized, precision = optimized.float(), "fp32"
    report["precision"] = precision

    recipe = {"passes": applied, "precision": precision, "compile": settings.compile,
              "compile_mode": settings.compile_mode, "source": str(model_dir)}
    save_variant(out_dir, model_dir, optimized, spec, optimize=recipe)

    with console.status("checking and timing the optimised artifact"):
        reloaded, _ = load_artifact(out_dir, trust_code=trust_code)
        with torch.no_grad():
            final = compare(reloaded(*parity_inputs), reference, DTYPES[precision])
        report["parity"] = {"final": final.to_json()}
        if not final.ok:
            shutil.rmtree(out_dir)
            raise UserError(f"{out_dir}: the optimised artifact does not reproduce the original's outputs "
                            f"(max abs error {final.max_abs:.3g}); nothing was written")
        report["before"] = _measure(model, task, repeats)
        report["after"] = _measure(reloaded, task, repeats)
    b, a = report["before"], report["after"]
    report["speedup_batch1"] = round(b["latency_ms_batch1"] / a["latency_ms_batch1"], 3)
    report["speedup_batch8"] = round(b["latency_ms_batch8"] / a["latency_ms_batch8"], 3)
    if b["peak_memory_bytes_batch8"] and a["peak_memory_bytes_batch8"] is not None:
        report["peak_memory_ratio_batch8"] = round(a["peak_memory_bytes_batch8"] / b["peak_memory_bytes_batch8"], 3)
    if evaluate and (spec.data is not None or bundle is not None):
        from fullchain.stages.evaluate import evaluate_artifact

        with console.status("scoring both artifacts on the test split"):
            scored = {name: evaluate_artifact(d, split="test", bundle=bundle, trust_code=trust_code)
                      for name, d in (("before", model_dir), ("after", out_dir))}
            report["eval"] = {name: {k: v for k, v in metrics.items() if k in ("accuracy", "macro_f1", "loss", "n")}
                              for name, metrics in scored.items()}
    (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a report, for ``summary.json``."""
    if "quantize" in report:
        return {"quantize": report["quantize"]}
    keys = ("precision", "speedup_batch1", "speedup_batch8", "peak_memory_ratio_batch8", "before", "after", "eval")
    return {
        "passes": {o["pass"]: {"status": o["status"], "rewrites": len(o["rewrites"])} for o in report["passes"]},
        "parity": report["parity"]["final"],
        **{k: report[k] for k in keys if k in report},
    }
