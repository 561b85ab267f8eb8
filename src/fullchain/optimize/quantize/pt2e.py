"""The Inductor backend: PT2E quantisation (torchao) with the X86 Inductor quantizer, run through torch.compile.

torch.ao.quantization's eager and FX APIs are deprecated; PT2E lives in `torchao.quantization.pt2e`:
capture with torch.export, `prepare_pt2e` (observers) or `prepare_qat_pt2e` (fake quantisation, with
Conv-BN folded into the simulated int8 conv), then `convert_pt2e` to a graph of quantize/dequantize
ops around fp32 ops. That graph is only a recipe: it becomes int8 kernels (oneDNN qconv/qlinear with the
Conv-BN-ReLU chain fused) when Inductor compiles it with freezing on, which is what `compile_int8` does.

Persisting: the converted graph is saved with `torch.export.save` as ``model.pt2``;
`fullchain.artifact.program.load_program` opens it only after every archive member is admitted, then compiles
it here (`FrozenProgram`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.export import Dim

from fullchain.errors import UserError

PROGRAM_FILE = "model.pt2"
# The ops that prove int8 execution once the converted graph is lowered for x86 (what Inductor emits).
INT8_KERNEL_PREFIXES = ("onednn.qconv", "onednn.qlinear", "quantized.")
Inputs = tuple[torch.Tensor, ...]  # a model's positional inputs (the task's input_names order)


def register_ops():
    """torchao defines the quantized_decomposed ops a converted program refers to; they must exist to load one."""
    _pt2e()


def _pt2e():
    """torchao imports slowly and chatters about optional CUDA extensions; import it only when used."""
    from torchao.quantization import pt2e
    from torchao.quantization.pt2e import quantize_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer

    return pt2e, quantize_pt2e, x86_inductor_quantizer


def _export(model: torch.nn.Module, example: Inputs) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch (and sequence, for token inputs) dimension.

    A batch of 1 would be specialised by export, so the example is doubled when it has a single row.
    """
    if example[0].shape[0] == 1:
        example = tuple(torch.cat([x, x]) for x in example)
    dims = tuple({0: Dim.AUTO, **({1: Dim.AUTO} if x.dim() == 2 and not x.is_floating_point() else {})}
                 for x in example)
    return torch.export.export(model, tuple(example), dynamic_shapes=dims)


def export_graph(model: torch.nn.Module, example: Inputs) -> torch.fx.GraphModule:
    try:
        return _export(model, example).module()
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the user needs the reason
        raise UserError(f"quantize: torch.export could not capture {type(model).__name__}: {exc}") from None


def make_quantizer(method: str):
    """X86InductorQuantizer: int8 per-channel symmetric weights, uint8 per-tensor activations."""
    _, _, xiq = _pt2e()
    config = xiq.get_default_x86_inductor_quantization_config(
        is_qat=method == "qat", is_dynamic=method == "dynamic"
    )
    return xiq.X86InductorQuantizer().set_global(config)


@torch.no_grad()
def quantize_ptq(
    model: torch.nn.Module, example: Inputs, calibration: Iterable[Inputs], method: str = "ptq"
) -> torch.fx.GraphModule:
    """Post-training quantisation: observe `calibration` batches, then convert (static or dynamic int8)."""
    _, qp, _ = _pt2e()
    prepared = qp.prepare_pt2e(export_graph(model.eval(), example), make_quantizer(method))
    for xs in calibration:
        prepared(*xs)
    return _drop_dead_weights(qp.convert_pt2e(prepared))


def prepare_qat(model: torch.nn.Module, example: Inputs) -> torch.fx.GraphModule:
    """Fake-quantised training graph; `.train()` / `.eval()` switch BatchNorm and dropout as on a Module."""
    pt2e, qp, _ = _pt2e()
    prepared = qp.prepare_qat_pt2e(export_graph(model.train(), example), make_quantizer("qat"))
    pt2e.allow_exported_model_train_eval(prepared)
    return prepared


def convert_qat(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    _, qp, _ = _pt2e()
    prepared.eval()
    return _drop_dead_weights(qp.convert_pt2e(prepared))


def _drop_dead_weights(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """convert_pt2e folds each weight into an int8 constant but keeps the fp32 original as a parameter."""
    used = {str(n.target) for n in graph.graph.nodes if n.op == "get_attr"}
    for name, _ in list(graph.named_parameters()) + list(graph.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attr)
    return graph


def fake_quant_modules(prepared: torch.fx.GraphModule) -> dict[str, torch.nn.Module]:
    """The observer / fake-quantize modules PT2E inserted (named ``activation_post_process_N``)."""
    return {name: m for name, m in prepared.named_children() if name.startswith("activation_post_process")}


def compile_frozen(graph: torch.nn.Module):
    """Inductor with freezing: weights become constants, q/dq patterns become oneDNN int8 kernels.

    Freezing is switched on process-wide (as TORCHINDUCTOR_FREEZING=1 would): passed through
    ``torch.compile(options=...)`` it does not reach the quantisation lowering, which then fails.
    """
    import torch._inductor.config

    torch._inductor.config.freezing = True
    return torch.compile(graph, dynamic=False)


class FrozenProgram:
    """A converted graph run through Inductor with freezing, one compiled copy per input shape.

    The frozen int8 lowering handles static shapes only (a dynamic batch fails in ``qconv_prepack``) and
    rewrites the graph it compiles, so a new shape compiles a fresh copy (seconds; cached on disk by
    Inductor). Calls run under ``torch.no_grad`` so the grad mode never forces a recompile.
    """

    def __init__(self, graph: torch.nn.Module):
        self.graph = graph
        self._compiled: dict[tuple[int, ...], object] = {}

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple(tuple(x.shape) for x in inputs)
        if key not in self._compiled:
            self._compiled[key] = compile_frozen(copy.deepcopy(self.graph))
        return self._compiled[key](*inputs)


def int8_kernels(converted: torch.fx.GraphModule, example: Inputs) -> list[str]:
    """The int8 kernels the converted graph lowers to on x86 (torchao's lowering = Inductor's freezing passes)."""
    _pt2e()
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    lowered = lower_pt2e_quantized_to_x86(converted, tuple(example))
    return graph_ops(lowered, INT8_KERNEL_PREFIXES)


def graph_ops(graph: torch.fx.GraphModule, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    return sorted(op for op in ops if op.startswith(prefixes))


def save_program(converted: torch.fx.GraphModule, example: Inputs, path: Path) -> Path:
    """Re-export the converted graph (dynamic batch) and write it with torch.export.save."""
    torch.export.save(_export(converted, example), str(path))
    return path
