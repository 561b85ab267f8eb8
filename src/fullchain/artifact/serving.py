"""`load`: an artifact (or an exported ``.onnx`` with model.json beside it) as a ready-to-call model.

The one place that decides how every variant runs:
- a model directory: its torch module (float, optimised, bf16, compiled), under ``torch.inference_mode``;
- the same directory with a ``model.onnx`` (``ds export``) or a bare ``.onnx`` file: an ONNX Runtime session;
- an int8 artifact (``ds optimize --quantize``): its ``model.onnx`` for the onnxruntime backend, its
  ``model.pt2`` program (checked member by member, then compiled per input shape) for the inductor backend,
  never the float weights it also carries.

What comes back also carries the model's Task and its text encoder, read from the model.json next to the
weights, so every runtime answers from the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fullchain.artifact.meta import META, ONNX_FILE, WEIGHTS, ArtifactMeta, read_meta
from fullchain.artifact.store import load_artifact, text_encoding
from fullchain.data.tokenizer import TextEncoder
from fullchain.errors import UserError
from fullchain.runtime.sessions import OnnxRuntime, Runtime, TorchRuntime, default_threads
from fullchain.tasks import Task

RUNTIMES = ("torch", "onnxruntime")


@dataclass
class LoadedModel:
    runtime: Runtime
    meta: ArtifactMeta
    task: Task
    encoder: TextEncoder | None
    source: Path

    @property
    def label_names(self) -> list[str]:
        return self.meta.label_names


def quantization_of(path: Path) -> dict[str, Any] | None:
    """What `ds optimize --quantize` recorded in a directory's model.json (None for a float artifact)."""
    return read_meta(path).extra.get("quantize") if path.is_dir() and (path / META).is_file() else None


def resolve_runtime(path: Path, runtime: str | None) -> str:
    """The runtime a path runs with when none is named: ONNX Runtime for a .onnx file, for a directory holding
    only `model.onnx`, or for an int8 artifact quantised for ONNX Runtime; torch otherwise.

    An int8 artifact carries its float weights too (model.safetensors); running those by accident would
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


def load(
    path: str | Path, runtime: str | None = None, threads: int | None = None, *, trust_code: bool = False
) -> LoadedModel:
    """The model at `path` ready to call with `runtime` (torch or onnxruntime; None: by the path).

    `threads`: intra-op threads of the forward pass (default: `default_threads()`); sets torch's for the process.
    `trust_code`: the torch runtime may import the user code the artifact names (`fullchain.models.targets`).
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
            raise UserError(f"{path}: a .onnx file runs with --runtime onnxruntime, not {runtime}")
        directory, onnx_path = path.parent, path
    else:
        directory, onnx_path = path, path / ONNX_FILE
    meta = read_meta(directory)
    if runtime == "torch" and quantization_of(directory) is not None:  # Inductor int8: the exported program
        from fullchain.artifact.program import load_program

        engine: Runtime = TorchRuntime(load_program(directory), threads)
    elif runtime == "torch":
        model, _ = load_artifact(directory, trust_code=trust_code)
        engine = TorchRuntime(model, threads)
    else:
        if not onnx_path.is_file():
            raise UserError(f"{directory}: no {ONNX_FILE}; write it with: ds export {directory} --format onnx")
        engine = OnnxRuntime(onnx_path, threads)
    return LoadedModel(engine, meta, meta.make_task(), text_encoding(directory, meta), path)
