"""Graph passes over a captured ``torch.fx.GraphModule``; each returns the list of places it changed.

`PASSES` is the registry in the order ``--passes all`` runs them.
"""

from fullchain.optimize.passes.attention import fuse_attention
from fullchain.optimize.passes.common import Pass, Rewrite
from fullchain.optimize.passes.conv_bn import ConvReLU, fold_conv_bn, fuse_conv_bn_relu
from fullchain.optimize.passes.qkv import fuse_qkv

PASSES: dict[str, Pass] = {
    "fuse_qkv": fuse_qkv,
    "fuse_attention": fuse_attention,
    "fold_conv_bn": fold_conv_bn,
    "fuse_conv_bn_relu": fuse_conv_bn_relu,
}

__all__ = ["PASSES", "ConvReLU", "Pass", "Rewrite", "fold_conv_bn", "fuse_attention", "fuse_conv_bn_relu", "fuse_qkv"]
