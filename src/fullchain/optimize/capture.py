"""Capture a model into a torch.fx graph that the passes rewrite.

We use ``torch.fx.symbolic_trace`` on purpose rather than ``torch.export``: it keeps ``nn.Linear``,
``nn.Conv2d`` and ``nn.BatchNorm2d`` as module calls, so the passes can read and replace weights
module by module, while functional code (``@``, ``softmax``, ``einsum``, ``masked_fill``) shows up
as individual nodes. ``torch.export`` would lower everything to aten ops (``linear`` → ``addmm``),
which the module-level passes cannot see. The graph is then annotated with shapes and dtypes by
running it once on example inputs (``ShapeProp``), which the passes use to check axes.

When tracing fails (data-dependent control flow, an untraceable call), `CaptureError` names the
innermost module being traced and the line of user code that blocked it; the model is not modified.
"""

from __future__ import annotations

import copy
import traceback
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fullchain.errors import UserError

_TORCH_DIR = str(Path(torch.__file__).parent)


class CaptureError(UserError):
    """The model could not be turned into a graph; the message says where and why."""


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: ``file:line: code``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return "inside torch"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno}: {(f.line or '').strip()}"


def capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Trace a deep copy of ``model`` (in eval mode) into a shape-annotated ``GraphModule``."""
    model = copy.deepcopy(model).eval()
    tracer = fx.Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        # The tracer does not unwind its module stack on an exception: the last entry is where it failed.
        inside = [path for path, _ in tracer.module_stack.values() if path]
        where = inside[-1] if inside else type(model).__name__
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(
            f"cannot capture {type(model).__name__} into a graph: module '{where}' at {_user_frame(exc)} "
            f"({type(exc).__name__}: {reason}); the model was left unchanged"
        ) from None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    annotate_shapes(gm, example_inputs)
    return gm


def annotate_shapes(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Record each node's output shape and dtype in ``node.meta['tensor_meta']``."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def module_path(node: fx.Node) -> str:
    """The innermost module whose forward produced ``node`` (recorded by the tracer), or the node's name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return next(reversed(stack.values()))[0] or node.name
    return node.name


def tensor_ndim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
