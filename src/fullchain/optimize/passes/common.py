"""What every pass shares: the record of a rewrite and small questions asked of fx nodes."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn


@dataclass(frozen=True)
class Rewrite:
    """One place a pass changed: which pass, where (module path or node name) and what it did."""

    pass_name: str
    where: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"pass": self.pass_name, "where": self.where, "detail": self.detail}


Pass = Callable[[fx.GraphModule], list[Rewrite]]


def module_of(gm: fx.GraphModule, node: fx.Node, kinds: type | tuple[type, ...]) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, if it is one of ``kinds``."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    return module if isinstance(module, kinds) else None


def only_user(node: fx.Node) -> fx.Node | None:
    """The single node that reads ``node``, or None when it has zero or several readers."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def module_call_count(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def free_name(gm: fx.GraphModule, wanted: str) -> str:
    """``wanted`` if no submodule has that path yet, else ``wanted_1``, ``wanted_2``, ..."""
    existing = {name for name, _ in gm.named_modules()}
    name, i = wanted, 0
    while name in existing:
        i += 1
        name = f"{wanted}_{i}"
    return name


def erase_unused(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes (consumers first) once nothing reads them."""
    for node in nodes:
        if node.graph is gm.graph and not node.users:
            gm.graph.erase_node(node)


def finish(gm: fx.GraphModule) -> None:
    """Check the rewritten graph, regenerate its code and drop submodules nothing calls any more."""
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


aten = torch.ops.aten

# What a node computes, whatever level it was captured at: torch functions and tensor methods (fx tracing)
# and ATen overloads (torch.export). `op_kind` names it; the passes match on these names.
_KINDS: dict[str, tuple[tuple, tuple[str, ...]]] = {
    "matmul": ((operator.matmul, torch.matmul, torch.bmm, aten.matmul.default, aten.bmm.default),
               ("matmul", "bmm", "__matmul__")),
    "baddbmm": ((torch.baddbmm, aten.baddbmm.default), ("baddbmm",)),
    "einsum": ((torch.einsum, aten.einsum.default), ()),
    "softmax": ((torch.softmax, torch.nn.functional.softmax, aten.softmax.int, aten._softmax.default), ("softmax",)),
    "transpose": ((torch.transpose, aten.transpose.int), ("transpose",)),
    "permute": ((torch.permute, aten.permute.default), ("permute",)),
    "mul": ((operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar), ("mul", "__mul__")),
    "div": ((operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar), ("div", "truediv", "__truediv__")),
    "add": ((operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor), ("add", "add_", "__add__")),
    "masked_fill": ((torch.masked_fill, aten.masked_fill.Scalar, aten.masked_fill_.Scalar), ("masked_fill",)),
    "where": ((torch.where, aten.where.self, aten.where.ScalarOther), ()),
    "dropout": ((torch.nn.functional.dropout, aten.dropout.default), ()),
    "cast": ((aten.to.dtype, aten._to_copy.default, aten.type_as.default), ("to", "float", "type_as", "type")),
    "relu": ((torch.relu, torch.nn.functional.relu, aten.relu.default), ("relu",)),
    "sdpa": ((torch.nn.functional.scaled_dot_product_attention, aten.scaled_dot_product_attention.default), ()),
}
_BY_TARGET = {target: kind for kind, (functions, _) in _KINDS.items() for target in functions}
_BY_METHOD = {name: kind for kind, (_, methods) in _KINDS.items() for name in methods}


def op_kind(node: object) -> str | None:
    """The canonical name of what ``node`` computes (see `_KINDS`), or None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        try:
            return _BY_TARGET.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    return None
