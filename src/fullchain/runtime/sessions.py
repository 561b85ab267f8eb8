"""The two ways fullchain runs a model for inference: a torch module or an ONNX Runtime session.

Both are callables taking the model's inputs positionally (in the task's `input_names` order) and returning
the outputs as a float32 numpy array, so the server, ``ds evaluate`` and the benchmarks treat them alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fullchain.errors import UserError


class Runtime(Protocol):
    name: str

    def __call__(self, *inputs: torch.Tensor) -> np.ndarray:
        """Outputs (logits) as float32 for a collated batch's model inputs."""
        ...


def default_threads() -> int:
    """Half the cores for inference, the rest for HTTP handling: on a shared 2-core machine, 2 OpenMP threads
    turn a 35 us forward pass into 5 ms (threads spin waiting for a descheduled peer)."""
    return max(1, (os.cpu_count() or 2) // 2)


class TorchRuntime:
    name = "torch"

    def __init__(self, model: Callable[..., torch.Tensor], threads: int | None = None):
        self.model = model.eval() if isinstance(model, torch.nn.Module) else model
        self.threads = threads or default_threads()

    def __call__(self, *inputs: torch.Tensor) -> np.ndarray:
        if torch.get_num_threads() != self.threads:  # OpenMP's thread count is per calling thread
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.model(*inputs).float().numpy()


def ort_session(path: str | Path, threads: int | None = None, spinning: bool = True) -> Any:
    """A CPU (or CUDA, when this onnxruntime build has it) session.

    ``spinning=False`` makes idle intra-op threads sleep: measured side by side with PyTorch on few cores,
    ORT's default busy-waiting starves PyTorch's OpenMP threads (a CNN's fp32 eager call went from 1 ms to
    320 ms here), so benchmarks switch it off.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise UserError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = True):
        self.session = ort_session(path, threads, spinning)
        self.input_names = [i.name for i in self.session.get_inputs()]
        first = self.session.get_inputs()[0].shape[0]
        self.static_batch = first if isinstance(first, int) else None  # `ds export --static-batch`

    def __call__(self, *inputs: torch.Tensor) -> np.ndarray:
        arrays = [x.numpy() for x in inputs]
        n = self.static_batch
        if n is None or len(arrays[0]) == n:
            return self._run(arrays)
        chunks = []  # a fixed-batch model: run in slices of its size, the last one padded with its first row
        for start in range(0, len(arrays[0]), n):
            parts = [a[start:start + n] for a in arrays]
            short = n - len(parts[0])
            if short:
                parts = [np.concatenate([p, np.repeat(p[:1], short, axis=0)]) for p in parts]
            chunks.append(self._run(parts)[:n - short])
        return np.concatenate(chunks)

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        if len(arrays) != len(self.input_names):
            raise UserError(f"the ONNX model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                            f"got {len(arrays)}")
        return self.session.run(None, dict(zip(self.input_names, arrays, strict=True)))[0]
