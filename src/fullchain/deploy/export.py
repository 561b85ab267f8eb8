"""`ds export`: a model artifact -> ONNX (checked against torch in ONNX Runtime) or a TensorRT engine.

`export_onnx` is the Python entry point (the optimise stage calls it too). It uses torch's dynamo exporter
(`torch.onnx.export(..., dynamo=True)`), which handles every reference model here, and falls back to the
TorchScript exporter with a message for a model the dynamo exporter rejects. The batch dimension (and the
sequence dimension of token inputs, which the server pads per batch) stays dynamic. Parity runs the ONNX
file in ONNX Runtime on sample inputs of two shapes and compares against the eager model.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fullchain.artifact import META, TOKENIZER, load_artifact, sample_inputs
from fullchain.errors import UserError

INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_TOLERANCE = 1e-4


@dataclass
class ExportReport:
    path: str
    exporter: str  # "dynamo" or "torchscript"
    dynamic_batch: bool
    opset: int | None
    max_abs_error: float = float("nan")
    tolerance: float = DEFAULT_TOLERANCE
    parity_ok: bool = False
    checked_shapes: list[list[int]] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)  # batch-1 medians: torch eager, onnxruntime
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _dynamic_dims(x: torch.Tensor, dynamic_batch: bool) -> dict[int, Any]:
    dims = {0: torch.export.Dim.DYNAMIC} if dynamic_batch else {}
    if x.dtype == torch.long and x.dim() == 2:
        dims[1] = torch.export.Dim.DYNAMIC
    return dims


def export_onnx(
    model: torch.nn.Module,
    sample: torch.Tensor,
    path: str | Path,
    dynamic_batch: bool = True,
    opset: int | None = None,
    check_with: list[torch.Tensor] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Write `model` (one tensor in, logits out) as ONNX to `path` and check it in ONNX Runtime.

    `sample` fixes the traced shapes; parity is checked on `sample` and on every tensor in `check_with`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dims = _dynamic_dims(sample, dynamic_batch)
    report = ExportReport(str(path), "dynamo", dynamic_batch, opset, tolerance=tolerance)
    torch_logs = logging.getLogger("torch.onnx")
    level = torch_logs.level
    torch_logs.setLevel(logging.ERROR)  # the exporter's "torchvision is not installed" chatter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(
                    model, (sample,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=(dims,) if dims else None, opset_version=opset, verbose=False,
                )
                program.save(str(path))
            except Exception as exc:  # the dynamo exporter's failures come in many types
                reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                report.exporter = "torchscript"
                report.notes.append(f"dynamo exporter failed ({type(exc).__name__}: {reason}); "
                                    "used the TorchScript exporter instead")
                axes = {i: f"dim{i}" for i in dims}
                torch.onnx.export(
                    model, (sample,), str(path), dynamo=False, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], opset_version=opset or 17,
                    dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: "dim0"}} if axes else None,
                )
    finally:
        torch_logs.setLevel(level)
    check_parity(model, path, [sample, *(check_with or [])], report)
    return report


def check_parity(model: torch.nn.Module, path: Path, inputs: list[torch.Tensor], report: ExportReport) -> None:
    """Largest |onnxruntime - torch| over `inputs`, relative to the logits' scale when that exceeds 1."""
    from fullchain.deploy.runtimes import OnnxRuntime

    session = OnnxRuntime(path)
    worst, ok = 0.0, True
    for x in inputs:
        with torch.inference_mode():
            expected = model(x).float().numpy()
        got = session(x)
        if got.shape != expected.shape:
            raise UserError(f"{path}: ONNX output shape {list(got.shape)} differs from torch {list(expected.shape)} "
                            f"for input {list(x.shape)}")
        err = float(np.max(np.abs(got - expected))) if expected.size else 0.0
        worst = max(worst, err)
        ok = ok and err <= report.tolerance * max(1.0, float(np.max(np.abs(expected))))
        report.checked_shapes.append(list(x.shape))
    report.max_abs_error, report.parity_ok = worst, ok


def compare_latency(model: torch.nn.Module, path: Path, x: torch.Tensor, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds per call, torch eager against ONNX Runtime, alternating after a warm-up."""
    from fullchain.deploy.runtimes import OnnxRuntime, TorchRuntime

    contenders = {"torch": TorchRuntime(model), "onnxruntime": OnnxRuntime(path)}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn(x)
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn(x)
            times[name].append(1000 * (time.perf_counter() - start))
    return {f"{name}_ms": statistics.median(v) for name, v in times.items()}


def carry_preprocessing(model_dir: Path, out_dir: Path) -> None:
    """model.json and tokenizer.json beside the exported file, so it serves and preprocesses on its own."""
    if out_dir.resolve() == model_dir.resolve():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (META, TOKENIZER):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)


def export_artifact(
    model_dir: str | Path,
    out: str | Path | None = None,
    fmt: str = "onnx",
    dynamic_batch: bool = True,
    opset: int | None = None,
    fp16: bool = True,
) -> ExportReport:
    """`ds export`: the artifact as ONNX (default `<model_dir>/model.onnx`) or a TensorRT engine."""
    from fullchain.deploy import tensorrt

    model_dir = Path(model_dir)
    if fmt not in ("onnx", "tensorrt"):
        raise UserError(f"--format {fmt!r} is not one of onnx, tensorrt")
    builder = tensorrt.find_builder() if fmt == "tensorrt" else None  # fail fast when TensorRT is missing
    model, spec = load_artifact(model_dir)
    default_name = "model.onnx" if fmt == "onnx" else "model.engine"
    out = Path(out) if out is not None else model_dir / default_name
    if fmt == "tensorrt" and out.suffix == ".onnx":
        raise UserError(f"--out {out}: a TensorRT engine needs another name (e.g. {out.with_suffix('.engine')}); "
                        "the ONNX file it is built from is written beside it")
    onnx_path = out if fmt == "onnx" else out.with_suffix(".onnx")
    carry_preprocessing(model_dir, out.parent)
    batch = 3 if dynamic_batch else 1  # a static model takes one request at a time
    sample = sample_inputs(spec, batch=batch, length=24)
    other = sample_inputs(spec, batch=5 if dynamic_batch else 1, length=40, seed=1)
    report = export_onnx(model, sample, onnx_path, dynamic_batch, opset, check_with=[other])
    report.latency_ms = compare_latency(model, onnx_path, sample_inputs(spec, batch=1, length=24, seed=2))
    if builder is not None:
        report.notes += tensorrt.build_engine(builder, onnx_path, out, spec, fp16=fp16)
        report.path = str(out)
    return report
