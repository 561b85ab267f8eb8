"""`ds optimize`: a model artifact in, an optimised artifact and ``optimize_report.json`` out.

Order: inference precision (checked against fp32 with the dtype's tolerance; rolled back with a warning
if it fails) -> graph passes on the model in that dtype (each checked for parity on sample and edge
inputs and timed against the model before it, see `manager`; the report lists the passes rolled back for
speed) -> optional ``torch.compile`` (recorded in the recipe, applied when the artifact is loaded).
Before/after latencies are measured alternately and reported with their rounds and thread count. Quantisation
(``--quantize``) is its own path in `fullchain.optimize.quantize`, which starts from the fp32
artifact. The written artifact is loaded back the way every later stage loads it and checked
once more against the original, so what the report measures is what `ds serve` will run.
"""

from __future__ import annotations

import copy
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
from fullchain.optimize.manager import PassManager, PassRolledBack, resolve_pass_names
from fullchain.optimize.measure import paired_latency, peak_memory_bytes
from fullchain.optimize.parity import TOLERANCES, compare, edge_inputs
from fullchain.optimize.recipe import DTYPES, InferencePrecision, cast_inputs
from fullchain.tasks import Task

REPORT = "optimize_report.json"
LATENCY_BATCHES = (1, 8)


def _measure(before: torch.nn.Module, after: torch.nn.Module, task: Task, repeats: int) -> dict[str, Any]:
    """Latency of both models at batch 1 and 8 (the model's full input length), timed alternately: medians per
    call, the median of per-round ratios, with the rounds and thread count; peak memory of each at batch 8."""
    length = getattr(task, "max_length", None)
    figures: dict[str, Any] = {"before": {}, "after": {}, "latency": {}}
    with torch.inference_mode():
        for batch in LATENCY_BATCHES:
            xs = task.example_inputs(batch, length=length, seed=batch)
            timed = paired_latency(lambda xs=xs: before(*xs), lambda xs=xs: after(*xs), rounds=max(3, repeats))
            figures["before"][f"latency_ms_batch{batch}"] = round(timed.before_ms, 3)
            figures["after"][f"latency_ms_batch{batch}"] = round(timed.after_ms, 3)
            figures["latency"][f"batch{batch}"] = timed.to_json()
            figures[f"speedup_batch{batch}"] = round(1 / timed.ratio, 3)
        for name, model in (("before", before), ("after", after)):
            figures[name]["peak_memory_bytes_batch8"] = peak_memory_bytes(lambda model=model: model(*xs))
    return figures


def _check_source(model_dir: Path, spec: ArtifactMeta, settings: OptimizeConfig) -> None:
    if spec.extra.get("optimize"):
        raise UserError(f"{model_dir}: already optimised ({META} has extra.optimize); optimise the original artifact")
    if "hf" in spec.builder and settings.quantize == "none" and resolve_pass_names(settings.passes):
        # Such a directory is also a Hugging Face checkpoint: its weights keep transformers' names, which fused
        # layers would change, and transformers runs its own SDPA attention there already.
        raise UserError(f"{model_dir}: graph passes are not applied to a Hugging Face artifact (its weights keep "
                        "transformers' names); use --passes none with --precision bf16, or --quantize dynamic")


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
    _check_source(model_dir, read_meta(model_dir), settings)
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

    precision = settings.precision
    if precision != "fp32":  # checked first: the graph is captured in the dtype it will run in
        lowered = InferencePrecision(copy.deepcopy(model).to(DTYPES[precision]), DTYPES[precision])
        with torch.no_grad():
            parity = compare(lowered(*parity_inputs), reference, DTYPES[precision])
        report["precision_parity"] = parity.to_json()
        if not parity.ok:
            console.print(f"[yellow]warning:[/] {precision} rolled back: max abs error {parity.max_abs:.3g} "
                          f"exceeds the {precision} tolerance; the artifact stays fp32")
            precision = "fp32"
    report["precision"] = precision
    dtype = DTYPES[precision]
    working = copy.deepcopy(model).to(dtype) if dtype != torch.float32 else model

    timing = task.example_inputs(1, length=getattr(task, "max_length", None), seed=1)
    manager = PassManager(settings.passes, tolerance=TOLERANCES[dtype])
    with console.status("applying graph passes"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PassRolledBack)
        optimized, outcomes = manager.run(working, cast_inputs(parity_inputs, dtype),
                                          probes=[cast_inputs(p, dtype) for p in edge_inputs(task)],
                                          timing_inputs=cast_inputs(timing, dtype))
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    report["passes"] = [o.to_json() for o in outcomes]
    report["rolled_back_for_speed"] = [o.name for o in outcomes if o.reason == "slower"]
    if manager.captured is not None:
        report["capture"] = manager.captured.to_json()
        for line in manager.captured.failures:
            console.print(f"[yellow]warning:[/] not captured, left as it is: {line}")
    applied = [o.name for o in outcomes if o.status == "applied"]

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
        report.update(_measure(model, reloaded, task, repeats))
    b, a = report["before"], report["after"]
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
    keys = ("precision", "speedup_batch1", "speedup_batch8", "peak_memory_ratio_batch8", "before", "after", "latency",
            "rolled_back_for_speed", "capture", "eval")
    return {
        "passes": {o["pass"]: {"status": o["status"], "rewrites": len(o["rewrites"])} for o in report["passes"]},
        "parity": report["parity"]["final"],
        **{k: report[k] for k in keys if k in report},
    }
