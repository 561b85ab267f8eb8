"""One loader for everything `ds serve` can serve: `load_runtime(path, runtime)`.

- a model artifact directory (model.safetensors + model.json): the torch module in eval mode, run under
  `torch.inference_mode`;
- the same directory with a `model.onnx` in it (written by `ds export`, or by `ds optimize --backend
  onnxruntime`): an ONNX Runtime session;
- a bare `.onnx` file with model.json (and tokenizer.json for text) beside it;
- an int8 artifact from `ds optimize --quantize`: its `model.onnx` for the onnxruntime backend, its
  `model.pt2` (compiled once per batch size) for the inductor backend, never its float weights.

The preprocessing (tokenizer, label names, normalisation) always comes from the model.json next to the
weights, so every runtime answers from the same inputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fullchain.artifact import META, WEIGHTS, ModelSpec, load_artifact, load_tokenizer, read_spec
from fullchain.deploy.preprocess import Preprocessor
from fullchain.errors import UserError

ONNX_FILE = "model.onnx"
RUNTIMES = ("torch", "onnxruntime")


class Runtime(Protocol):
    name: str

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """Logits ``[B, classes]`` as float32 for a collated batch."""
        ...


class TorchRuntime:
    name = "torch"

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], threads: int | None = None):
        self.model = model.eval() if isinstance(model, torch.nn.Module) else model
        self.threads = threads or default_threads()

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        if torch.get_num_threads() != self.threads:  # OpenMP's thread count is per calling thread
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(batch).float().numpy()


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = ort_session(path, threads)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.static_batch = first.shape[0] if isinstance(first.shape[0], int) else None  # `ds export --static-batch`

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.numpy()
        n = self.static_batch
        if n is None or len(x) == n:
            return self.session.run(None, {self.input_name: x})[0]
        chunks = []  # a fixed-batch model: run in slices of its size, the last one padded with its first row
        for start in range(0, len(x), n):
            part = x[start:start + n]
            padded = np.concatenate([part, np.repeat(part[:1], n - len(part), axis=0)]) if len(part) < n else part
            chunks.append(self.session.run(None, {self.input_name: padded})[0][:len(part)])
        return np.concatenate(chunks)


def default_threads() -> int:
    """Half the cores for inference, the rest for HTTP handling: on a shared 2-core machine, 2 OpenMP threads
    turn a 35 us forward pass into 5 ms (threads spin waiting for a descheduled peer)."""
    return max(1, (os.cpu_count() or 2) // 2)


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU (or CUDA, when this onnxruntime build has it) session using torch's thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise UserError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None


@dataclass
class LoadedModel:
    runtime: Runtime
    spec: ModelSpec
    preprocessor: Preprocessor
    source: Path

    @property
    def label_names(self) -> list[str]:
        return self.spec.label_names


def quantization_of(path: Path) -> dict[str, Any] | None:
    """What `ds optimize --quantize` recorded in a directory's model.json (None for a float artifact)."""
    return read_spec(path).extra.get("quantize") if path.is_dir() and (path / META).is_file() else None


def resolve_runtime(path: Path, runtime: str | None) -> str:
    """The runtime a path serves with when none is named: ONNX Runtime for a .onnx file, for a directory
    holding only `model.onnx`, or for an int8 artifact quantised for ONNX Runtime; torch otherwise.

    An int8 artifact carries its float weights too (model.safetensors); serving those by accident would
    silently drop the quantisation, so asking for the other runtime is an error."""
    if runtime is not None and runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    quantized = quantization_of(path)
    if quantized is not None:
        native = "onnxruntime" if quantized.get("backend") == "onnxruntime" else "torch"
        if runtime not in (None, native):
            raise UserError(f"{path}: an int8 model quantised for the {quantized.get('backend')} backend; "
                            f"serve it with --runtime {native}")
        return native
    onnx_only = path.is_dir() and (path / ONNX_FILE).is_file() and not (path / WEIGHTS).is_file()
    return runtime or ("onnxruntime" if path.suffix == ".onnx" or onnx_only else "torch")


def load_runtime(path: str | Path, runtime: str | None = None, threads: int | None = None) -> LoadedModel:
    """The model at `path` ready to serve with `runtime` (torch or onnxruntime; None: by the path).

    `threads`: intra-op threads of the forward pass (default: `default_threads()`); sets torch's for the process.
    """
    path = Path(path)
    threads = threads or default_threads()
    if not path.exists():
        raise UserError(f"{path}: no such model directory or .onnx file")
    runtime = resolve_runtime(path, runtime)
    if path.is_file():
        if path.suffix != ".onnx":
            raise UserError(f"{path}: expected a model directory or a .onnx file")
        if runtime != "onnxruntime":
            raise UserError(f"{path}: a .onnx file is served with --runtime onnxruntime, not {runtime}")
        directory, onnx_path = path.parent, path
    else:
        directory, onnx_path = path, path / ONNX_FILE
    spec = read_spec(directory)
    if runtime == "torch" and quantization_of(directory) is not None:  # Inductor int8: the exported program
        from fullchain.optimize.quantize import load_program

        engine: Runtime = TorchRuntime(load_program(directory), threads)
    elif runtime == "torch":
        model, _ = load_artifact(directory)
        engine = TorchRuntime(model, threads)
    else:
        if not onnx_path.is_file():
            raise UserError(f"{directory}: no {ONNX_FILE}; write it with: ds export {directory} --format onnx")
        engine = OnnxRuntime(onnx_path, threads)
    return LoadedModel(engine, spec, Preprocessor(spec, load_tokenizer(directory)), path)
