"""A torch module -> an ONNX file, checked against torch in ONNX Runtime.

`export_onnx` uses torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`) and falls back to the
TorchScript exporter, with a note, for a model the dynamo exporter rejects. Inputs keep their names (the
task's `input_names`) and the dimensions the task marks dynamic (batch; sequence for token inputs); the output
is ``logits``. Parity runs the file in ONNX Runtime on the export inputs and any others given and compares
with the eager module. ``ds export`` and the ONNX Runtime quantisation backend both export through here.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fullchain.errors import UserError
from fullchain.runtime.sessions import OnnxRuntime, TorchRuntime

OUTPUT_NAME = "logits"
DEFAULT_TOLERANCE = 1e-4
Inputs = tuple[torch.Tensor, ...]


@dataclass
class ExportReport:
    path: str
    exporter: str  # "dynamo" or "torchscript"
    dynamic_batch: bool
    opset: int | None
    max_abs_error: float = float("nan")
    tolerance: float = DEFAULT_TOLERANCE
    parity_ok: bool = False
    checked_shapes: list[list[list[int]]] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)  # batch-1 medians: torch eager, onnxruntime
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def export_onnx(
    model: torch.nn.Module,
    inputs: Inputs,
    path: str | Path,
    input_names: Sequence[str],
    dynamic_dims: dict[str, dict[int, str]] | None = None,
    opset: int | None = None,
    check_with: Sequence[Inputs] = (),
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Write `model` as ONNX to `path` and check it in ONNX Runtime on `inputs` and every tuple in `check_with`.

    `dynamic_dims` maps an input name to its varying dimensions (``{0: "batch", 1: "sequence"}``); dimensions
    not named there are fixed at the export inputs' sizes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    dims = {name: (dynamic_dims or {}).get(name, {}) for name in input_names}
    dynamic_batch = all(0 in d for d in dims.values())
    report = ExportReport(str(path), "dynamo", dynamic_batch, opset, tolerance=tolerance)
    torch_logs = logging.getLogger("torch.onnx")
    level = torch_logs.level
    torch_logs.setLevel(logging.ERROR)  # the exporter's "torchvision is not installed" chatter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                shapes = tuple({i: torch.export.Dim.DYNAMIC for i in d} for d in dims.values())
                if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values()):
                    shapes = (shapes,)  # torch.export binds forward(*args) as one tuple argument
                program = torch.onnx.export(
                    model, tuple(inputs), dynamo=True, input_names=list(input_names), output_names=[OUTPUT_NAME],
                    dynamic_shapes=shapes if any(dims.values()) else None, opset_version=opset, verbose=False,
                )
                program.save(str(path))
            except Exception as exc:  # the dynamo exporter's failures come in many types
                report.exporter = "torchscript"
                report.notes.append(f"dynamo exporter failed ({type(exc).__name__}: {_reason(exc)}); "
                                    "used the TorchScript exporter instead")
                axes = {name: {i: f"{name}_{label}" for i, label in d.items()} for name, d in dims.items() if d}
                if dynamic_batch:
                    axes[OUTPUT_NAME] = {0: "batch"}
                torch.onnx.export(model, tuple(inputs), str(path), dynamo=False, input_names=list(input_names),
                                  output_names=[OUTPUT_NAME], opset_version=opset or 17, dynamic_axes=axes or None)
    except Exception as exc:  # noqa: BLE001 - both exporters failed: one line with the reason
        raise UserError(f"{path}: this model cannot be exported to ONNX ({type(exc).__name__}: {_reason(exc)})") \
            from None
    finally:
        torch_logs.setLevel(level)
    check_parity(model, path, [tuple(inputs), *check_with], report)
    return report


def check_parity(model: torch.nn.Module, path: Path, inputs: Sequence[Inputs], report: ExportReport) -> None:
    """Largest |onnxruntime - torch| over `inputs`, relative to the outputs' scale when that exceeds 1."""
    session = OnnxRuntime(path)
    worst, ok = 0.0, True
    for xs in inputs:
        with torch.inference_mode():
            expected = model(*xs).float().numpy()
        got = session(*xs)
        if got.shape != expected.shape:
            raise UserError(f"{path}: ONNX output shape {list(got.shape)} differs from torch {list(expected.shape)} "
                            f"for inputs {[list(x.shape) for x in xs]}")
        err = float(np.max(np.abs(got - expected))) if expected.size else 0.0
        worst = max(worst, err)
        ok = ok and err <= report.tolerance * max(1.0, float(np.max(np.abs(expected))))
        report.checked_shapes.append([list(x.shape) for x in xs])
    report.max_abs_error, report.parity_ok = worst, ok


def compare_latency(model: torch.nn.Module, path: Path, inputs: Inputs, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds per call, torch eager against ONNX Runtime, alternating after a warm-up."""
    contenders = {"torch": TorchRuntime(model), "onnxruntime": OnnxRuntime(path)}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn(*inputs)
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn(*inputs)
            times[name].append(1000 * (time.perf_counter() - start))
    return {f"{name}_ms": statistics.median(v) for name, v in times.items()}
