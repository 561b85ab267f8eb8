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


def is_call(node: fx.Node, functions: Iterable[Callable] = (), methods: Iterable[str] = ()) -> bool:
    """True if ``node`` calls one of ``functions`` or one of the tensor ``methods``."""
    if node.op == "call_function":
        return node.target in tuple(functions)
    if node.op == "call_method":
        return node.target in tuple(methods)
    return False


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


MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm)
MATMUL_METHODS = ("matmul", "bmm")
