"""`fold_conv_bn` and `fuse_conv_bn_relu`: inference-time folding of BatchNorm (and ReLU) into convolutions.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it folds into the
conv's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval`` does the arithmetic). A
following ReLU then runs in place on the conv's fresh output (`ConvReLU`), saving one full-size
tensor per block; the pair is also the unit that int8 backends quantise together.

A pattern is rewritten only when the conv's output feeds nothing but the BatchNorm (a model that
also reads the raw conv output keeps both), the conv is called from one place only, and the
BatchNorm has running statistics.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fullchain.optimize.passes.common import (
    Rewrite,
    erase_unused,
    finish,
    module_call_count,
    module_of,
    only_user,
    op_kind,
)

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ConvReLU(nn.Module):
    """A convolution whose output goes through ReLU in place (inference only)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.conv(x))


def _conv_feeding(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The conv call that is ``node``'s input and is read by nothing else, or None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    conv = node.args[0]
    if module_of(gm, conv, CONVS) is None or only_user(conv) is not node:
        return None
    return conv if module_call_count(gm, str(conv.target)) == 1 else None


def _foldable(bn: nn.Module) -> bool:
    return bn.track_running_stats and bn.running_mean is not None and bn.affine is not None


def fold_conv_bn(gm: fx.GraphModule) -> list[Rewrite]:
    """Fold every eval-mode BatchNorm that directly follows a conv into that conv."""
    rewrites = []
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node, BATCHNORMS)
        conv_node = _conv_feeding(gm, node) if bn is not None and len(node.args) == 1 else None
        if conv_node is None or not _foldable(bn):
            continue
        target = str(conv_node.target)
        conv = gm.get_submodule(target)
        gm.add_submodule(target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        node.replace_all_uses_with(conv_node)
        erase_unused(gm, [node])
        rewrites.append(Rewrite("fold_conv_bn", target, f"{node.target} folded into {target}"))
    if rewrites:
        finish(gm)
    return rewrites


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if module_of(gm, node, nn.ReLU) is not None:
        return True
    return op_kind(node) == "relu" and not node.kwargs.get("inplace", False)


def fuse_conv_bn_relu(gm: fx.GraphModule) -> list[Rewrite]:
    """Fold conv -> BatchNorm, then run conv -> ReLU as one `ConvReLU` module."""
    rewrites = fold_conv_bn(gm)
    for node in list(gm.graph.nodes):
        conv_node = _conv_feeding(gm, node) if _is_relu(gm, node) and len(node.args) == 1 else None
        if conv_node is None:
            continue
        target = str(conv_node.target)
        gm.add_submodule(target, ConvReLU(gm.get_submodule(target)))
        node.replace_all_uses_with(conv_node)
        erase_unused(gm, [node])
        relu = node.target if node.op == "call_module" else node.name
        rewrites.append(Rewrite("fuse_conv_bn_relu", target, f"{target} + {relu} -> ConvReLU"))
    if rewrites:
        finish(gm)
    return rewrites
