"""`fuse_qkv`: sibling ``nn.Linear`` layers that read the same input become one Linear and a split.

Q, K and V projections of self-attention are the common case; K and V of cross-attention, or any
other group of Linears fed by one tensor, fuse the same way. One larger matrix multiply replaces
several small ones, so the input is read once. Weights and biases are concatenated along the
output axis (a missing bias becomes zeros when another member has one); the fused module is
registered beside the first member as ``<parent>.fused_<names>`` and its output is split back with
``torch.split`` in the original order, so downstream code is untouched.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from fullchain.optimize.passes.common import Rewrite, erase_unused, finish, free_name, module_of

NAME = "fuse_qkv"


def _fusable(members: list[nn.Linear]) -> bool:
    first = members[0]
    return all(
        m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device and type(m) is nn.Linear
        for m in members
    )


def _fused_linear(members: list[nn.Linear]) -> nn.Linear:
    first = members[0]
    has_bias = any(m.bias is not None for m in members)
    out_features = sum(m.out_features for m in members)
    fused = nn.Linear(first.in_features, out_features, bias=has_bias, device=first.weight.device,
                      dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in members], dim=0))
        if has_bias:
            fused.bias.copy_(torch.cat([
                m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype) for m in members
            ]))
    return fused.train(first.training)


def _sibling_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Linear calls grouped by the node they read, groups of two or more, in graph order."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if module_of(gm, node, nn.Linear) is not None and len(node.args) == 1 and not node.kwargs:
            source = node.args[0]
            if isinstance(source, fx.Node):
                by_input.setdefault(source, []).append(node)
    return [nodes for nodes in by_input.values() if len(nodes) >= 2]


def fuse_qkv(gm: fx.GraphModule) -> list[Rewrite]:
    """Fuse every group of sibling Linears; returns one rewrite per group."""
    rewrites = []
    for nodes in _sibling_groups(gm):
        members = [gm.get_submodule(str(n.target)) for n in nodes]
        if not _fusable(members):
            continue
        paths = [str(n.target) for n in nodes]
        parent = paths[0].rpartition(".")[0]
        leaves = "_".join(p.rpartition(".")[2] for p in paths)
        name = free_name(gm, f"{parent}.fused_{leaves}" if parent else f"fused_{leaves}")
        gm.add_submodule(name, _fused_linear(members))
        with gm.graph.inserting_before(nodes[0]):
            fused = gm.graph.call_module(name, (nodes[0].args[0],))
            parts = gm.graph.call_function(torch.split, (fused, [m.out_features for m in members]), {"dim": -1})
            outputs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
        for node, output in zip(nodes, outputs, strict=True):
            output.meta = dict(node.meta)
            node.replace_all_uses_with(output)
        erase_unused(gm, nodes)
        rewrites.append(Rewrite(NAME, name, f"{len(nodes)} Linears ({', '.join(paths)}) -> one "
                                            f"{members[0].in_features}x{sum(m.out_features for m in members)}"))
    if rewrites:
        finish(gm)
    return rewrites
