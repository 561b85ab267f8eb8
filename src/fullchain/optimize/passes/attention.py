"""`fuse_attention`: explicit softmax attention becomes one ``F.scaled_dot_product_attention`` call.

The pattern is found backwards from every softmax, accepting the spellings people write:

    scores = Q·Kᵀ          matmul / bmm / ``@`` with K transposed (transpose, permute, ``.mT``),
                           or ``einsum("...qd,...kd->...qk")``
    scores = scores / c    or ``* c`` (a Python number), optional
    scores = scores + M    additive mask, or ``masked_fill(B, value)`` with a boolean mask, optional
    P = softmax(scores, dim=last axis)    (``F.softmax``, ``torch.softmax`` or ``.softmax``)
    P = dropout(P)         an ``nn.Dropout`` module or ``F.dropout`` (identity in eval), optional
    out = P·V              matmul / bmm / ``@``, or ``einsum("...qk,...kd->...qd")``

It is rewritten only when every intermediate result has exactly one reader (a model that also
returns the attention probabilities keeps its graph), the softmax runs over the key axis and
the softmax keeps the input dtype. The scale is passed explicitly (SDPA's default is 1/sqrt(d));
a ``masked_fill`` becomes the equivalent additive mask ``where(B, value, 0)`` in Q's dtype, so
rows whose keys are all masked behave exactly as before.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from fullchain.optimize.capture import module_path, tensor_ndim
from fullchain.optimize.passes.common import (
    MATMUL_FUNCTIONS,
    MATMUL_METHODS,
    Rewrite,
    erase_unused,
    finish,
    is_call,
    module_of,
    only_user,
)

NAME = "fuse_attention"
_SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax)
_DIV = ((operator.truediv, torch.div), ("div", "truediv"))
_MUL = ((operator.mul, torch.mul), ("mul",))
_ADD = ((operator.add, torch.add), ("add",))
_MASKED_FILL = ((torch.masked_fill,), ("masked_fill",))


@dataclass
class _Match:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    mask: fx.Node | None
    fill: tuple[fx.Node, float] | None  # (boolean mask, fill value) of a masked_fill
    chain: list[fx.Node]  # the nodes the fused call replaces, consumers first


def _last_axis(node: fx.Node, dim: object) -> bool:
    if not isinstance(dim, int):
        return False
    if dim == -1:
        return True
    ndim = tensor_ndim(node)
    return ndim is not None and dim == ndim - 1


def _untransposed(node: fx.Node) -> fx.Node | None:
    """X when ``node`` is X with its last two axes swapped, else None."""
    ndim = tensor_ndim(node)
    if is_call(node, (torch.transpose,), ("transpose",)):
        dims = list(node.args[1:3]) if len(node.args) >= 3 else [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        if ndim is None or not all(isinstance(d, int) for d in dims):
            return None
        if sorted(d % ndim for d in dims) == [ndim - 2, ndim - 1]:
            return node.args[0]
        return None
    if is_call(node, (torch.permute,), ("permute",)):
        perm = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], list | tuple) else node.args[1:]
        if ndim is None or not all(isinstance(d, int) for d in perm) or len(perm) != ndim:
            return None
        swapped = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        return node.args[0] if [d % ndim for d in perm] == swapped else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def _einsum_roles(equation: str) -> tuple[str, str, str] | None:
    """(left, right, out) index strings with ``...`` folded into one letter, or None if not 2 operands."""
    eq = equation.replace(" ", "").replace("...", "#")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    operands = lhs.split(",")
    return (operands[0], operands[1], out) if len(operands) == 2 else None


def _is_scores_einsum(a: str, b: str, out: str) -> bool:
    """``P x d, P y d -> P x y``: Q·Kᵀ over the last index, same leading indices."""
    if len(a) < 2 or len(a) != len(b) or len(out) != len(a):
        return False
    prefix, x, d, y = a[:-2], a[-2], a[-1], b[-2]
    return b[:-2] == prefix and b[-1] == d and out == prefix + x + y and len({x, y, d}) == 3


def _is_values_einsum(a: str, b: str, out: str) -> bool:
    """``P x y, P y d -> P x d``: probabilities times V over the key index."""
    if len(a) < 2 or len(a) != len(b) or len(out) != len(a):
        return False
    prefix, x, y, d = a[:-2], a[-2], a[-1], b[-1]
    return b[:-2] == prefix and b[-2] == y and out == prefix + x + d and len({x, y, d}) == 3


def _scores_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(Q, K) if ``node`` computes Q·Kᵀ."""
    if is_call(node, MATMUL_FUNCTIONS, MATMUL_METHODS) and len(node.args) == 2:
        k = _untransposed(node.args[1]) if isinstance(node.args[1], fx.Node) else None
        if k is not None and len(node.args[1].users) == 1:
            return node.args[0], k
        return None
    if is_call(node, (torch.einsum,)) and isinstance(node.args[0], str) and len(node.args) == 3:
        roles = _einsum_roles(node.args[0])
        if roles and _is_scores_einsum(*roles):
            return node.args[1], node.args[2]
    return None


def _values_operand(node: fx.Node, probs: fx.Node) -> fx.Node | None:
    """V if ``node`` computes ``probs``·V."""
    if is_call(node, MATMUL_FUNCTIONS, MATMUL_METHODS) and len(node.args) == 2 and node.args[0] is probs:
        return node.args[1]
    if is_call(node, (torch.einsum,)) and isinstance(node.args[0], str) and len(node.args) == 3:
        roles = _einsum_roles(node.args[0])
        if roles and node.args[1] is probs and _is_values_einsum(*roles):
            return node.args[2]
    return None


def _is_eval_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if module_of(gm, node, nn.Dropout) is not None:
        return True
    return is_call(node, (F.dropout,)) and node.kwargs.get("training", True) is False


def _match(gm: fx.GraphModule, softmax: fx.Node) -> _Match | None:
    if not is_call(softmax, _SOFTMAX_FUNCTIONS, ("softmax",)):
        return None
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if softmax.kwargs.get("dtype") is not None or not _last_axis(softmax, dim):
        return None
    chain = [softmax]
    # Forwards: optional eval dropout, then P·V.
    after = only_user(softmax)
    probs = softmax
    if after is not None and _is_eval_dropout(gm, after):
        chain.insert(0, after)
        probs, after = after, only_user(after)
    if after is None:
        return None
    v = _values_operand(after, probs)
    if v is None:
        return None
    chain.insert(0, after)
    # Backwards: optional mask, optional scale, Q·Kᵀ.
    node = softmax.args[0]
    mask = fill = None
    if is_call(node, *_ADD) and len(node.users) == 1 and all(isinstance(a, fx.Node) for a in node.args[:2]):
        scores_side = node.args[0] if _leads_to_scores(node.args[0]) else node.args[1]
        mask = node.args[1] if scores_side is node.args[0] else node.args[0]
        chain.append(node)
        node = scores_side
    elif is_call(node, *_MASKED_FILL) and len(node.users) == 1 and isinstance(node.args[2], int | float):
        fill = (node.args[1], float(node.args[2]))
        chain.append(node)
        node = node.args[0]
    scale = 1.0
    scaled = _scale_of(node) if isinstance(node, fx.Node) and len(node.users) == 1 else None
    if scaled is not None:
        chain.append(node)
        scale, node = scaled
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    qk = _scores_operands(node)
    if qk is None:
        return None
    chain.append(node)
    if is_call(node, MATMUL_FUNCTIONS, MATMUL_METHODS):  # the transpose feeding the matmul goes too
        chain.append(node.args[1])
    return _Match(q=qk[0], k=qk[1], v=v, scale=scale, mask=mask, fill=fill, chain=chain)


def _scale_of(node: fx.Node) -> tuple[float, fx.Node] | None:
    """(multiplier, X) when ``node`` is ``X / c``, ``X * c`` or ``c * X`` for a Python number c."""
    if len(node.args) != 2:
        return None
    a, b = node.args
    if is_call(node, *_DIV) and isinstance(a, fx.Node) and isinstance(b, int | float) and b != 0:
        return 1.0 / float(b), a
    if is_call(node, *_MUL) and isinstance(a, fx.Node) and isinstance(b, int | float):
        return float(b), a
    if is_call(node, *_MUL) and isinstance(b, fx.Node) and isinstance(a, int | float):
        return float(a), b
    return None


def _leads_to_scores(node: object) -> bool:
    """True if ``node`` is Q·Kᵀ, possibly scaled: tells the scores side of ``scores + mask`` from the mask."""
    if not isinstance(node, fx.Node):
        return False
    scaled = _scale_of(node)
    return _scores_operands(scaled[1] if scaled else node) is not None


def fuse_attention(gm: fx.GraphModule) -> list[Rewrite]:
    """Replace every matched attention with ``F.scaled_dot_product_attention``; returns the rewrites."""
    rewrites = []
    for softmax in list(gm.graph.nodes):
        if softmax.graph is not gm.graph:
            continue  # erased by an earlier rewrite
        match = _match(gm, softmax)
        if match is None:
            continue
        output = match.chain[0]
        with gm.graph.inserting_before(output):
            attn_mask = match.mask
            if match.fill is not None:
                boolean, value = match.fill
                dtype = gm.graph.call_function(getattr, (match.q, "dtype"))
                attn_mask = gm.graph.call_function(torch.where, (boolean, value, 0.0))
                attn_mask = gm.graph.call_method("to", (attn_mask, dtype))
            fused = gm.graph.call_function(
                F.scaled_dot_product_attention,
                (match.q, match.k, match.v),
                {"attn_mask": attn_mask, "dropout_p": 0.0, "scale": match.scale},
            )
        fused.meta = dict(output.meta)
        output.replace_all_uses_with(fused)
        erase_unused(gm, match.chain)
        spelled = "einsum" if output.target is torch.einsum else "matmul"
        masked = "masked_fill" if match.fill else ("additive mask" if match.mask is not None else "no mask")
        detail = f"{spelled} attention ({masked}, scale {match.scale:.4g}) -> scaled_dot_product_attention"
        rewrites.append(Rewrite(NAME, module_path(fused), detail))
    if rewrites:
        finish(gm)
    return rewrites
