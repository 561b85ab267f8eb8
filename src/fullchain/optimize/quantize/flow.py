"""One quantised model per (method, backend): the piece both `ds optimize --quantize` and `ds bench realtime` use.

`quantize_model` takes a float model, its task, calibration inputs and (for QAT) the training data, and returns
a `Quantized`: an inputs-in, logits-out `predict`, the servable file it wrote (``model.pt2`` for Inductor,
``model.onnx`` for ONNX Runtime), the int8 kernels it runs (read from the lowered graph or ORT's optimised
graph, not inferred from speed), and the float weights to keep beside it (QAT-trained for QAT).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fullchain.optimize.quantize import onnxrt, pt2e, qat
from fullchain.optimize.quantize.pt2e import Inputs
from fullchain.runtime.onnx import export_onnx
from fullchain.tasks import Task

ONNX_FILE = "model.onnx"  # the servable file of an ONNX Runtime int8 artifact (what `ds serve` looks for)

METHODS = ("ptq", "qat", "dynamic")
BACKENDS = ("inductor", "onnxruntime")


@dataclass
class TrainingData:
    """What QAT fine-tunes on (the artifact's own training split)."""

    dataset: Dataset
    collate: Callable
    steps: int
    lr: float
    batch_size: int = 64
    seed: int = 0
    callbacks: list[Any] = field(default_factory=list)


@dataclass
class Quantized:
    method: str
    backend: str
    file: Path  # the servable file (model.pt2 or model.onnx)
    int8_kernels: list[str]
    float_model: torch.nn.Module
    graph: torch.fx.GraphModule | None = None  # the converted PT2E graph (inductor backend)
    threads: int = 1

    def predictor(self, threads: int | None = None) -> Callable[..., torch.Tensor]:
        """A fresh inputs-in, logits-out callable (Inductor compiles at the thread count of its first call)."""
        if self.backend == "inductor":
            return pt2e.FrozenProgram(self.graph)
        return onnxrt.predictor(self.file, threads or self.threads)


def _onnx_int8(
    model: torch.nn.Module, task: Task, example: Inputs, calibration: Sequence[Inputs], method: str, out_dir: Path
) -> tuple[Path, list[str]]:
    path = out_dir / ONNX_FILE
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(model, example, fp32, task.input_names, task.dynamic_dims())
        onnxrt.quantize_onnx(fp32, path, "dynamic" if method == "dynamic" else "static", calibration,
                             task.input_names)
    return path, onnxrt.int8_kernels(path)


def finetune_qat(model: torch.nn.Module, example: Inputs, training: TrainingData) -> torch.fx.GraphModule:
    """QAT fine-tuning of a copy of `model`; the result feeds `quantize_model(..., qat_graph=...)`."""
    prepared, _ = qat.finetune(
        copy.deepcopy(model), example, training.dataset, training.collate, training.steps, training.lr,
        training.batch_size, training.seed, training.callbacks,
    )
    return prepared


def quantize_model(
    model: torch.nn.Module,
    task: Task,
    method: str,
    backend: str,
    example: Inputs,
    calibration: Sequence[Inputs],
    out_dir: Path,
    training: TrainingData | None = None,
    threads: int | None = None,
    qat_graph: torch.fx.GraphModule | None = None,
) -> Quantized:
    """Quantise `model` (left untouched) and write its servable file into `out_dir`.

    QAT fine-tunes a copy on `training`, or takes an already fine-tuned `qat_graph` (which the inductor
    backend consumes: conversion rewrites it).
    """
    if method not in METHODS or backend not in BACKENDS:
        raise ValueError(f"unknown quantisation {method!r} / backend {backend!r}")
    threads = threads or torch.get_num_threads()
    out_dir.mkdir(parents=True, exist_ok=True)
    float_model = model
    if method == "qat":
        if qat_graph is None:
            if training is None:
                raise ValueError("QAT needs training data")
            qat_graph = finetune_qat(model, example, training)
        float_model = qat.float_weights(qat_graph, copy.deepcopy(model))
    if backend == "inductor":
        converted = (pt2e.convert_qat(qat_graph) if method == "qat"
                     else pt2e.quantize_ptq(model, example, calibration, method))
        path = pt2e.save_program(converted, example, out_dir / pt2e.PROGRAM_FILE)
        return Quantized(method, backend, path, pt2e.int8_kernels(converted, example), float_model, converted, threads)
    path, kernels = _onnx_int8(float_model, task, example, calibration, method, out_dir)
    return Quantized(method, backend, path, kernels, float_model, threads=threads)
