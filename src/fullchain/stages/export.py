"""`ds export`: a model artifact -> ONNX (checked against torch in ONNX Runtime) or a TensorRT engine.

Every variant of an artifact exports as what it is: a float or optimised artifact through the exporter in
`fullchain.runtime.onnx` (inputs named after its task, dynamic batch and sequence); a compiled artifact as its
uncompiled graph (compiling is a runtime choice, recorded in model.json, not baked into a file); a bf16
artifact in bf16 when ONNX Runtime can run it, otherwise refused in one line naming the operator it lacks; an
int8 artifact quantised for ONNX Runtime keeps its int8 ``model.onnx`` (copied, never re-exported from its
float weights); an Inductor int8 program has no ONNX form and is refused. model.json and the tokenizer are
copied beside the file, so it serves and preprocesses on its own.

Parity is judged per precision: an fp32 graph within 1e-4 of torch (relative to the outputs' scale above 1),
a bf16 / fp16 graph within the relative tolerance `ds optimize` accepted for that dtype
(`fullchain.optimize.parity.TOLERANCES`), since ONNX Runtime's reduced-precision kernels accumulate
differently from torch's. An export that fails leaves no ``.onnx`` behind for a runtime to pick up.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from fullchain.artifact import META, ONNX_FILE, TOKENIZER_FILES, load_artifact, read_meta
from fullchain.config import RunConfig
from fullchain.errors import UserError
from fullchain.optimize.parity import TOLERANCES
from fullchain.optimize.recipe import DTYPES
from fullchain.runtime.onnx import DEFAULT_TOLERANCE, ExportReport, compare_latency, export_onnx

FORMATS = ("onnx", "tensorrt")


def carry_preprocessing(model_dir: Path, out_dir: Path) -> None:
    """model.json and the tokenizer files beside the exported file, so it serves and preprocesses on its own."""
    if out_dir.resolve() == model_dir.resolve():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (META, *TOKENIZER_FILES):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)


def _int8_onnx(model_dir: Path, onnx_path: Path, quantize: dict, trust_code: bool) -> ExportReport:
    """The int8 ONNX file `ds optimize --quantize ... --backend onnxruntime` wrote, kept as it is; its batch-1
    latency is measured against the float module it was quantised from."""
    if quantize.get("backend") != "onnxruntime":
        raise UserError(f"{model_dir}: an int8 program for the {quantize.get('backend')} backend has no ONNX form; "
                        "quantise with --backend onnxruntime to deploy int8 through ONNX")
    source = model_dir / ONNX_FILE
    if onnx_path.resolve() != source.resolve():
        shutil.copy2(source, onnx_path)
    report = ExportReport(str(onnx_path), "int8 (kept)", True, None, max_abs_error=0.0, parity_ok=True)
    report.notes.append(f"int8 ({quantize.get('method')}) ONNX model kept as quantised; test accuracy "
                        f"{quantize.get('accuracy_quantized')} against fp32 {quantize.get('accuracy_fp32')}; "
                        "torch latency is its fp32 module's")
    model, spec = load_artifact(model_dir, trust_code=trust_code)
    report.latency_ms = compare_latency(model, onnx_path, spec.make_task().example_inputs(1, seed=2))
    return report


def _missing_kernel(message: str) -> str | None:
    """The operator named in ONNX Runtime's refusal of a graph (no kernel, or a type its schema does not allow)."""
    found = re.search(r"implementation for (\w+)\(|of operator \((\w+)\)", message)
    return found and (found[1] or found[2])


def _written_at(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def export_artifact(
    model_dir: str | Path,
    out: str | Path | None = None,
    fmt: str = "onnx",
    dynamic_batch: bool = True,
    opset: int | None = None,
    fp16: bool = True,
    trust_code: bool = False,
) -> ExportReport:
    """`ds export`: the artifact as ONNX (default `<model_dir>/model.onnx`) or a TensorRT engine."""
    from fullchain.deploy import tensorrt

    model_dir = Path(model_dir)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    builder = tensorrt.find_builder() if fmt == "tensorrt" else None  # fail fast when TensorRT is missing
    spec = read_meta(model_dir)
    default_name = ONNX_FILE if fmt == "onnx" else "model.engine"
    out = Path(out) if out is not None else model_dir / default_name
    if fmt == "tensorrt" and out.suffix == ".onnx":
        raise UserError(f"--out {out}: a TensorRT engine needs another name (e.g. {out.with_suffix('.engine')}); "
                        "the ONNX file it is built from is written beside it")
    onnx_path = out if fmt == "onnx" else out.with_suffix(".onnx")
    carry_preprocessing(model_dir, out.parent)
    task = spec.make_task()
    if spec.extra.get("quantize"):
        report = _int8_onnx(model_dir, onnx_path, spec.extra["quantize"], trust_code)
    else:
        model, _ = load_artifact(model_dir, trust_code=trust_code, compiled=False)
        precision = (spec.extra.get("optimize") or {}).get("precision", "fp32")
        tolerance = DEFAULT_TOLERANCE if precision == "fp32" else TOLERANCES[DTYPES[precision]][1]
        length = getattr(task, "max_length", None)
        batch = 3 if dynamic_batch else 1  # a static model takes one request at a time
        dims = task.dynamic_dims() if dynamic_batch else {k: {i: v for i, v in d.items() if i} for k, d in
                                                          task.dynamic_dims().items()}
        before = _written_at(onnx_path)
        try:
            report = export_onnx(model, task.example_inputs(batch, min(24, length or 24)), onnx_path,
                                 task.input_names, dims, opset, tolerance=tolerance,
                                 check_with=[task.example_inputs(5 if dynamic_batch else 1, min(40, length or 40),
                                                                 seed=1)])
        except Exception as exc:
            if _written_at(onnx_path) != before:  # no half-made file for `ds serve --runtime onnxruntime`
                onnx_path.unlink()
            operator = _missing_kernel(str(exc)) if precision != "fp32" else None
            if operator:
                raise UserError(f"{model_dir}: a {precision} artifact has no ONNX form ONNX Runtime can run (no "
                                f"{precision} kernel for {operator}); export the fp32 artifact it was optimised "
                                f"from ({spec.extra['optimize'].get('source')})") from None
            raise
        report.latency_ms = compare_latency(model, onnx_path, task.example_inputs(1, min(24, length or 24), seed=2))
    if builder is not None:
        report.notes += tensorrt.build_engine(builder, onnx_path, out, task, fp16=fp16)
        report.path = str(out)
    return report


def export_stage(cfg: RunConfig, model_dir: Path, console: Console) -> dict[str, Any]:
    report = export_artifact(model_dir, None, cfg.export.format, cfg.export.dynamic_batch, cfg.export.opset,
                             trust_code=cfg.model.target is not None)
    for note in report.notes:
        console.print(f"export: {note}", highlight=False)
    if not report.parity_ok:
        console.print(f"[bold red]export: ONNX differs from torch by {report.max_abs_error:.2e}[/]")
    return {
        "format": cfg.export.format,
        "path": report.path,
        "exporter": report.exporter,
        "parity_ok": report.parity_ok,
        "parity_max_abs_error": report.max_abs_error,
        "latency_ms_batch1": report.latency_ms,
    }
