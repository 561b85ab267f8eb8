"""Capture a model into the torch.fx graphs that the passes rewrite: ``torch.export`` first, fx tracing second.

Why ``torch.export`` (non-strict) is the default: it runs the model's Python for real on fake tensors, so the
code people write goes through where ``torch.fx.symbolic_trace`` stops: sizes used as numbers
(``1 / math.sqrt(k.size(-1))``, ``torch.zeros(B * h, T, T)``), ``torch.finfo(x.dtype).min``, causal masks sliced
from a buffer by the traced length, the mask helpers of ``transformers`` and ``nn.MultiheadAttention``. Every
input dimension is exported as ``Dim.AUTO``, so a graph keeps the batch and sequence sizes symbolic where the
model allows it and runs on any length, length 1 included.

Why the graph is then reshaped (`_lift_modules`) rather than used as ``torch.export`` leaves it: the
ATen-level graph (``ExportedProgram.module()``) is a ``GraphModule`` whose parameters keep the original
module's names, which is the state-dict contract optimised artifacts rely on (`fullchain.optimize.recipe`
replays capture + passes at load time, then loads the saved weights). It calls ``aten.linear``,
``aten.conv2d`` and ``aten.batch_norm`` on those parameters; we turn each such call back into a call of the
original ``nn.Linear`` / ``nn.ConvNd`` / ``nn.BatchNormNd`` module, so the module-level passes (Q/K/V
fusion, conv/BN folding) keep working and the rest of the graph stays functional ATen. Devices the
exporter baked in (``arange(..., device=cpu)``) are replaced by the device of the graph's first
parameter, so a graph captured on CPU runs wherever its module is moved; dtype assertions are dropped.
The graph is captured at the dtype it will run in (see `fullchain.optimize.recipe`), since ATen graphs
record dtypes.

When ``torch.export`` fails, ``torch.fx.symbolic_trace`` is tried (it keeps module calls as they are).
When both fail for the whole model, each child module is captured on its own with the inputs it was
called with (recorded on one run of the example inputs), recursively, and the modules that neither can
capture are reported with the file and line that stopped them; the rest of the model is still optimised.
If nothing at all can be captured, `CaptureError` says where and why. The model given is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves, tree_map

from fullchain.errors import UserError

_TORCH_DIR = str(Path(torch.__file__).parent)
aten = torch.ops.aten


class CaptureError(UserError):
    """The model could not be turned into a graph; the message says where and why."""


@dataclass
class Captured:
    """The module to run (the whole graph, or the model with captured submodules swapped in) and how it got there.

    ``graphs`` maps each captured module path (``""`` for the whole model) to the method that captured it
    (``"export"`` or ``"fx"``); ``failures`` has one line per module neither method could capture.
    """

    module: nn.Module
    graphs: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"graphs": dict(self.graphs), "not_captured": list(self.failures)}


class _Failed(Exception):
    """Both capture methods failed for one module; ``where`` is one line naming the module and the code."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: ``file:line: code``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if not f.filename.endswith(("fullchain/optimize/capture.py", "/contextlib.py"))]
    if not frames:
        return "inside torch"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno}: {(f.line or '').strip()}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _auto_dims(value: Any) -> Any:
    """Every dimension the exporter may keep symbolic; sizes 0 and 1 it would specialise anyway (and say so)."""
    if not torch.is_tensor(value):
        return None
    return {i: torch.export.Dim.AUTO for i, size in enumerate(value.shape) if size > 1}


def _two_rows(inputs: Any) -> Any:
    """Inputs whose tensors all have a leading (batch) dimension of 1, repeated to 2 rows: from a batch of one the
    exporter would specialise the batch to 1, and the graph would refuse any other batch size."""
    tensors = [t for t in tree_leaves(inputs) if torch.is_tensor(t)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != 1 for t in tensors):
        return inputs
    return tree_map(lambda t: torch.cat([t, t]) if torch.is_tensor(t) else t, inputs)


@contextlib.contextmanager
def _quiet_exporter():
    """torch.export logs its decisions as warnings; capture reports its own outcome, so they are held back."""
    loggers = [logging.getLogger(name) for name in ("torch._export", "torch.export", "torch.fx.experimental")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# A guard such as ``L['x'].size()[1] != 2048`` excludes one size: the exporter's record that a slice of a buffer by
# the traced length (nanoGPT's ``self.bias[:, :, :T, :T]``) did not cover the whole buffer, which decides aliasing,
# not values. Kept, it would make the graph refuse the model's own longest input, so it is dropped; range guards
# (``<= 2048``) stay, and the optimise stage's parity check on the longest input confirms the values.
_EXCLUDES_ONE_SIZE = re.compile(r"\.size\(\)\[\d+\] != \d+$")


def _export(module: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    args, kwargs = _two_rows((args, kwargs))  # together: one batch dimension across every input
    signature = inspect.signature(module.forward)
    bound = signature.bind(*args, **kwargs)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()
           if p.name in bound.arguments):
        raise TypeError("variadic forward arguments")
    dynamic = {name: tree_map(_auto_dims, value) for name, value in bound.arguments.items()}
    with _quiet_exporter():
        program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic, strict=False)
    program._guards_code = [g for g in program._guards_code if not _EXCLUDES_ONE_SIZE.search(g)]
    gm = program.module()
    _lift_modules(gm, module)
    _drop_dead_reads(gm)
    _unbake_devices(gm)
    return _plain(gm, type(module).__name__)


def _plain(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """An ordinary ``GraphModule`` over the exported graph: ``ExportedProgram.module()`` refuses ``.eval()``,
    which every stage calls. Positional-tensors-in, tensors-out graphs also drop the pytree calling code."""
    info = gm.graph._codegen.pytree_info
    args_spec, kwargs_spec = info.in_spec.children()
    flat_in = kwargs_spec.num_children == 0 and all(c.is_leaf() for c in args_spec.children())
    flat_out = info.out_spec.is_leaf() or (info.out_spec.type is tuple
                                           and all(c.is_leaf() for c in info.out_spec.children()))
    if flat_in and flat_out:
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        results = output.args[0]
        output.args = (results[0] if info.out_spec.is_leaf() else tuple(results),)
        gm.graph.set_codegen(fx.CodeGen())
    return fx.GraphModule(gm, gm.graph, name)


def _fx(module: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    tracer = fx.Tracer()
    try:
        graph = tracer.trace(module)
    except Exception as exc:
        # The tracer does not unwind its module stack on an exception: the last entry is where it failed.
        inside = [path for path, _ in tracer.module_stack.values() if path]
        exc.fullchain_module = inside[-1] if inside else ""
        raise
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    bound = inspect.signature(gm.forward).bind(*args, **kwargs) if kwargs else None
    with torch.no_grad():
        ShapeProp(gm).propagate(*(bound.args if bound else args)[: len(placeholders)])
    return gm


def _capture_one(module: nn.Module, args: tuple, kwargs: dict, path: str) -> tuple[fx.GraphModule, str]:
    """``(graph, method)`` for one module in eval mode, or `_Failed` naming where both methods stopped."""
    try:
        return _export(module, args, kwargs), "export"
    except Exception as export_exc:
        try:
            return _fx(module, args, kwargs), "fx"
        except Exception as fx_exc:
            inner = getattr(fx_exc, "fullchain_module", "")
            where = ".".join(p for p in (path, inner) if p) or type(module).__name__
            frame = _user_frame(export_exc)
            if frame == "inside torch":
                frame = _user_frame(fx_exc)
            raise _Failed(f"module '{where}' at {frame} (torch.export: {_reason(export_exc)}; "
                          f"fx: {_reason(fx_exc)})") from None


def _recorded_calls(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, tuple[tuple, dict, int]]:
    """Per module path: the first call's ``(args, kwargs)`` and how many times it was called, from one run."""
    calls: dict[str, tuple[tuple, dict, int]] = {}
    handles = []
    for path, sub in model.named_modules():
        def hook(_module, a, k, path=path):
            first = calls.get(path, (a, k, 0))
            calls[path] = (first[0], first[1], first[2] + 1)
        handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _is_leaf(module: nn.Module) -> bool:
    """A module no pass can do anything with on its own: a single torch.nn layer."""
    return not any(True for _ in module.children()) and type(module).__module__.startswith("torch.nn")


def capture_model(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> Captured:
    """Capture a deep copy of ``model`` (eval mode): whole if possible, else module by module (module docstring)."""
    model = copy.deepcopy(model).eval()
    kwargs = example_kwargs or {}
    try:
        gm, method = _capture_one(model, tuple(example_inputs), kwargs, "")
        return Captured(gm, {"": method})
    except _Failed as failed:
        first_failure = failed.where
    calls = _recorded_calls(model, tuple(example_inputs), kwargs)
    captured = Captured(model)
    _capture_children(model, "", calls, captured)
    if not captured.graphs:
        raise CaptureError(f"cannot capture {type(model).__name__} into a graph: {first_failure}; "
                           "the model was left unchanged")
    by_place = {line.split(" (torch.export:")[0]: line for line in [first_failure, *captured.failures]}
    captured.failures = list(by_place.values())  # the whole model fails where one of its modules does
    return captured


def _capture_children(parent: nn.Module, prefix: str, calls: dict, captured: Captured) -> None:
    for name, child in list(parent.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if path not in calls or _is_leaf(child):
            continue
        args, kwargs, count = calls[path]
        if count > 1:  # one graph per call site would be needed: optimise inside it instead
            _capture_children(child, path, calls, captured)
            continue
        try:
            gm, method = _capture_one(child, args, kwargs, path)
        except _Failed as failed:
            captured.failures.append(failed.where)
            _capture_children(child, path, calls, captured)
            continue
        setattr(parent, name, gm)
        captured.graphs[path] = method


def capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """The whole ``model`` as one graph (a deep copy, eval mode), or `CaptureError` naming what stopped it."""
    model = copy.deepcopy(model).eval()
    try:
        return _capture_one(model, tuple(example_inputs), {}, "")[0]
    except _Failed as failed:
        raise CaptureError(f"cannot capture {type(model).__name__} into a graph: {failed.where}; "
                           "the model was left unchanged") from None


# --- shaping the exported graph ------------------------------------------------------------------------


def _attr_path(node: Any) -> str | None:
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _owner(path: str | None, leaf: str) -> str | None:
    if path is None or not path.endswith("." + leaf):
        return None
    return path[: -len(leaf) - 1]


_CONV_OPS = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _lifted_module(node: fx.Node, original: nn.Module) -> str | None:
    """The path of the module whose own forward ``node`` is, when the call is exactly that module's call."""
    if node.op != "call_function":
        return None
    args = list(node.args)
    path = _owner(_attr_path(args[1]) if len(args) > 1 else None, "weight")
    try:
        module = original.get_submodule(path) if path else None
    except AttributeError:
        return None
    if module is None:
        return None
    bias_path = _owner(_attr_path(args[2]), "bias") if len(args) > 2 and args[2] is not None else None
    has_bias = (bias_path == path) if len(args) > 2 and args[2] is not None else False
    if node.target is aten.linear.default and type(module) is nn.Linear and len(args) <= 3:
        return path if has_bias == (module.bias is not None) else None
    if node.target in _CONV_OPS and type(module) is _CONV_OPS[node.target] and module.padding_mode == "zeros":
        n = module.weight.dim() - 2
        defaults = [None, None, None, [1] * n, [0] * n, [1] * n, 1]
        given = [list(g) if isinstance(g, list | tuple) else g for g in (args + defaults[len(args):])[3:]]
        expected = [list(module.stride), module.padding if isinstance(module.padding, str) else list(module.padding),
                    list(module.dilation), module.groups]
        ok = given == expected
        return path if ok and has_bias == (module.bias is not None) else None
    if node.target is aten.batch_norm.default and type(module) in _BN_TYPES and len(args) >= 8:
        stats = [_owner(_attr_path(args[i]), leaf) for i, leaf in ((3, "running_mean"), (4, "running_var"))]
        if stats == [path, path] and args[5] is False and args[7] == module.eps and has_bias == module.affine:
            return path
    return None


def _lift_modules(gm: fx.GraphModule, original: nn.Module) -> None:
    """Turn ``aten.linear/convNd/batch_norm`` on a module's own parameters back into calls of that module."""
    lifted: set[str] = set()
    for node in list(gm.graph.nodes):
        path = _lifted_module(node, original)
        if path is None:
            continue
        if path not in lifted:
            owner = gm.get_submodule(path)
            module = copy.deepcopy(original.get_submodule(path))
            for name, tensor in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
                setattr(module, name, tensor)
            gm.set_submodule(path, module)
            lifted.add(path)
        inputs = [a for a in node.args[1:] if isinstance(a, fx.Node)]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attr in inputs:
            if not attr.users:
                gm.graph.erase_node(attr)


def _drop_dead_reads(gm: fx.GraphModule) -> None:
    """Drop dtype assertions (the graph may run in another dtype) and reads of attributes nothing uses
    (``num_batches_tracked``), which would keep a folded BatchNorm registered."""
    for node in list(gm.graph.nodes):
        dead_assert = node.op == "call_function" and node.target is aten._assert_tensor_metadata.default
        if (dead_assert or node.op == "get_attr") and not node.users:
            gm.graph.erase_node(node)


def _unbake_devices(gm: fx.GraphModule) -> None:
    """Replace device constants recorded at capture by the device of the graph's first parameter or buffer."""
    anchor = next((name for name, _ in [*gm.named_parameters(), *gm.named_buffers()]), None)
    if anchor is None:
        return
    users = [n for n in gm.graph.nodes if n.op == "call_function"
             and any(isinstance(a, torch.device) for a in [*n.args, *n.kwargs.values()])]
    if not users:
        return
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        device = gm.graph.call_function(getattr, (gm.graph.get_attr(anchor), "device"))
    for node in users:
        node.args = tuple(device if isinstance(a, torch.device) else a for a in node.args)
        node.kwargs = {k: device if isinstance(v, torch.device) else v for k, v in node.kwargs.items()}


# --- questions the passes ask of nodes ------------------------------------------------------------------


def module_path(node: fx.Node) -> str:
    """The innermost module whose forward produced ``node`` (recorded by the tracer), or the node's name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return next(reversed(stack.values()))[0] or node.name
    return node.name


def tensor_shape(node: Any) -> tuple | None:
    """The shape recorded for ``node`` (``ShapeProp`` for fx graphs, the fake value for exported ones)."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape)
    val = node.meta.get("val")
    return tuple(val.shape) if torch.is_tensor(val) else None


def tensor_dtype(node: Any) -> torch.dtype | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "dtype"):
        return meta.dtype
    val = node.meta.get("val")
    return val.dtype if torch.is_tensor(val) else None


def tensor_ndim(node: Any) -> int | None:
    shape = tensor_shape(node)
    return None if shape is None else len(shape)
