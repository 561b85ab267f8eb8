"""`fuse_attention`: explicit softmax attention becomes one ``F.scaled_dot_product_attention`` call.

Attention is recognised by what it computes, on graphs captured by ``torch.export`` (ATen ops) or fx
(torch functions and tensor methods) alike, walking out from every softmax over the key axis the way
Inductor's ``fuse_attention`` patterns describe it, but without a list of spellings:

    S = Q·Kᵀ       any product contracting the head dimension: matmul / bmm / ``@`` with K transposed or
                   permuted (or given already as Kᵀ), ``baddbmm`` (``alpha`` is a scale, the input with
                   ``beta=1`` an additive bias, ignored with ``beta=0``), ``einsum`` in any index layout
    S = S·c, S/c   a constant scale (one computed from a traced size is a constant after capture); a scale
                   folded into Q, or none, needs nothing
    S = S + M      additive masks and position biases, any number of them
    S = masked_fill(S, B, f) or where(keep, S, f), as the last step before softmax (a lower-triangular
                   buffer sliced to the sequence, GPT-2's ``bias[:, :, :T, :T]``, becomes ``is_causal``)
    P = softmax(S), in S's dtype or upcast and cast back (``softmax(x.float()).type_as(x)``)
    P = dropout(P) in eval
    O = P·V        matmul / bmm / einsum; K and V may be grouped (multi-query, grouped-query attention:
                   ``expand`` + ``reshape`` of K and V become ``enable_gqa``)

The rewrite reproduces every row, fully masked ones included, where SDPA's own semantics differ: SDPA gives
zeros on a row whose keys are all masked, while the original gives NaN for a ``-inf`` fill or an all
``-inf`` additive row, and the plain mean of V when a finite fill replaced every score (softmax of equal
values is uniform). One ``where`` over such rows restores the original numbers; it is left out when the
masks are finite by construction. A finite fill above -1e4 keeps real probability on masked keys, which
an SDPA mask cannot express, so such patterns are left alone, as is a fill applied before an additive
term. Nothing is rewritten unless every intermediate result has exactly one reader (a model that also
returns the probabilities keeps its graph) and Q, K, V, the masks and the output share one dtype.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from fullchain.optimize.capture import module_path, tensor_dtype, tensor_ndim, tensor_shape
from fullchain.optimize.passes.common import Rewrite, erase_unused, finish, module_of, only_user, op_kind

NAME = "fuse_attention"
LARGE_NEGATIVE = -1e4  # fills at or below this give masked keys exactly zero probability in fp32 and below
aten = torch.ops.aten


@dataclass
class _Operand:
    """A tensor as SDPA needs it: ``node`` permuted by ``perm`` (None: as it is)."""

    node: fx.Node
    perm: list[int] | None = None


@dataclass
class _Fill:
    blocked: fx.Node | None  # True where the score is replaced (masked_fill's mask), or None ...
    keep: fx.Node | None  # ... when given as where(keep, S, f)
    value: float


@dataclass
class _Match:
    q: _Operand
    k: _Operand
    v: _Operand
    scale: float
    additive: list[fx.Node]
    fill: _Fill | None
    out_perm: list[int] | None
    chain: list[fx.Node] = field(default_factory=list)  # the nodes the fused call replaces, consumers first
    spelled: str = "matmul"
    grouped: bool = False
    causal: bool = False  # the fill's mask is a causal buffer sliced to the sequence: SDPA's is_causal


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _identity(perm: list[int]) -> bool:
    return perm == list(range(len(perm)))


def _swap_last(n: int) -> list[int]:
    return [*range(n - 2), n - 1, n - 2]


def _permutation(node: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """``(X, P)`` when ``node`` is ``X.permute(P)`` (transpose, permute or ``.mT``), else None."""
    ndim = tensor_ndim(node)
    if ndim is None:
        return None
    kind = op_kind(node)
    if kind == "transpose":
        dims = [_arg(node, 1, "dim0"), _arg(node, 2, "dim1")]
        if not all(isinstance(d, int) for d in dims):
            return None
        perm = list(range(ndim))
        a, b = (d % ndim for d in dims)
        perm[a], perm[b] = perm[b], perm[a]
        return node.args[0], perm
    if kind == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], list | tuple) else node.args[1:]
        if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
            return None
        return node.args[0], [d % ndim for d in dims]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0], _swap_last(ndim)
    return None


def _key_of(kt: fx.Node) -> _Operand | None:
    """K such that ``K.mT`` is ``kt``, reading through a transpose or permute that produced ``kt``."""
    ndim = tensor_ndim(kt)
    if ndim is None or ndim < 3:
        return None
    swap = _swap_last(ndim)
    inner = _permutation(kt)
    if inner is None:
        return _Operand(kt, swap)
    source, perm = inner
    composed = [perm[i] for i in swap]
    return _Operand(source, None if _identity(composed) else composed)


# --- einsum ---------------------------------------------------------------------------------------------


def _einsum_parts(node: fx.Node) -> tuple[list[str], str, list[fx.Node]] | None:
    """``(operand index strings, output string, operands)`` with ``...`` spelled out, for two operands."""
    equation = node.args[0] if node.args else None
    if not isinstance(equation, str) or "->" not in equation:
        return None
    operands = node.args[1] if len(node.args) >= 2 and isinstance(node.args[1], list | tuple) else node.args[1:]
    if len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands):
        return None
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    widths = []
    for term, operand in zip(terms, operands, strict=True):
        ndim = tensor_ndim(operand)
        if ndim is None:
            return None
        widths.append(ndim - len(term.replace("...", "")) if "..." in term else 0)
    width = max(widths)
    if any("..." in t and w != width for t, w in zip(terms, widths, strict=True)):
        return None
    ellipsis = "".join(spare[:width])
    terms = [t.replace("...", ellipsis) for t in terms]
    out = out.replace("...", ellipsis)
    if any(len(set(t)) != len(t) for t in [*terms, out]):
        return None
    return terms, out, list(operands)


def _order(source: str, target: str) -> list[int] | None:
    """The permutation taking axes named ``source`` to the order ``target`` (None when it is the identity)."""
    perm = [source.index(c) for c in target]
    return None if _identity(perm) else perm


def _einsum_scores(node: fx.Node) -> tuple[_Operand, _Operand] | None:
    """Q and K (in SDPA's layout) when ``node`` is an einsum whose output ends with (query, key) axes."""
    parts = _einsum_parts(node)
    if parts is None:
        return None
    (a, b), out, (left, right) = parts
    if len(out) < 3:
        return None
    batch, x, y = out[:-2], out[-2], out[-1]
    contracted = (set(a) & set(b)) - set(out)
    if len(contracted) != 1 or x not in a or x in b or y not in b or y in a:
        return None
    (d,) = contracted
    if set(a) != set(batch) | {x, d} or set(b) != set(batch) | {y, d}:
        return None
    return _Operand(left, _order(a, batch + x + d)), _Operand(right, _order(b, batch + y + d))


def _einsum_values(node: fx.Node, probs: fx.Node) -> tuple[_Operand, list[int] | None] | None:
    """V (in SDPA's layout) and the permutation of SDPA's output to the einsum's, when ``node`` is P·V."""
    parts = _einsum_parts(node)
    if parts is None or parts[2][0] is not probs:
        return None
    (p, v), out, (_, value) = parts
    batch, x, y = p[:-2], p[-2], p[-1]
    extra = set(v) - set(batch) - {y}
    if len(extra) != 1 or y in out or x not in out or len(out) != len(p):
        return None
    (e,) = extra
    if set(v) != set(batch) | {y, e} or set(out) != set(batch) | {x, e}:
        return None
    return _Operand(value, _order(v, batch + y + e)), _order(batch + x + e, out)


# --- the scores side ------------------------------------------------------------------------------------


def _readers(node: fx.Node) -> int:
    """How many nodes read ``node``'s values (``y.type_as(node)`` only reads its dtype)."""
    return sum(1 for u in node.users if not ("type_as" in str(u.target) and u.args[0] is not node))


def _scale_of(node: fx.Node) -> tuple[float, fx.Node] | None:
    """(multiplier, X) when ``node`` is ``X / c``, ``X * c`` or ``c * X`` for a number c."""
    kind = op_kind(node)
    if kind not in ("mul", "div") or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if kind == "div" and isinstance(a, fx.Node) and _number(b) and b != 0:
        return 1.0 / float(b), a
    if kind == "mul" and isinstance(a, fx.Node) and _number(b):
        return float(b), a
    if kind == "mul" and isinstance(b, fx.Node) and _number(a):
        return float(a), b
    return None


@dataclass
class _Product:
    q: _Operand
    k: _Operand
    scale: float
    bias: fx.Node | None  # baddbmm's input with beta=1
    spelled: str
    transposed_k: fx.Node | None  # the Kᵀ node read by a matmul, removed with it


def _product(node: fx.Node) -> _Product | None:
    """Q·Kᵀ (times a constant, plus a bias for baddbmm), whatever op computes it."""
    kind = op_kind(node)
    if kind == "matmul" and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        q, kt = node.args
        k = _key_of(kt)
        if k is None or tensor_ndim(q) != tensor_ndim(kt):
            return None
        return _Product(_Operand(q), k, 1.0, None, "matmul", kt)
    if kind == "baddbmm" and len(node.args) >= 3:
        bias, q, kt = node.args[:3]
        beta, alpha = _arg(node, 3, "beta", 1), _arg(node, 4, "alpha", 1)
        k = _key_of(kt) if isinstance(kt, fx.Node) else None
        if k is None or not (_number(beta) and _number(alpha)) or beta not in (0, 1):
            return None
        return _Product(_Operand(q), k, float(alpha), bias if beta == 1 else None, "baddbmm", kt)
    if kind == "einsum":
        qk = _einsum_scores(node)
        return None if qk is None else _Product(qk[0], qk[1], 1.0, None, "einsum", None)
    return None


def _reaches_product(node: object) -> bool:
    """True if ``node`` is Q·Kᵀ possibly scaled and with terms added: tells scores from mask in ``S + M``."""
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return False
        if _product(node) is not None:
            return True
        scaled = _scale_of(node)
        if scaled is not None:
            node = scaled[1]
        elif op_kind(node) == "add" and len(node.args) == 2:
            return _reaches_product(node.args[0]) or _reaches_product(node.args[1])
        else:
            return False
    return False


def _fill_of(node: fx.Node) -> tuple[_Fill, fx.Node] | None:
    """The fill and the scores it is applied to, for ``masked_fill(S, B, f)`` or ``where(keep, S, f)``."""
    kind = op_kind(node)
    if kind == "masked_fill" and len(node.args) == 3 and _number(node.args[2]):
        return _Fill(node.args[1], None, float(node.args[2])), node.args[0]
    if kind == "where" and len(node.args) == 3 and isinstance(node.args[1], fx.Node) and _number(node.args[2]):
        return _Fill(None, node.args[0], float(node.args[2])), node.args[1]
    return None


def _scores(node: fx.Node, chain: list[fx.Node]) -> tuple[_Product, float, list[fx.Node], _Fill | None] | None:
    """Walk from the softmax input back to Q·Kᵀ: (product, scale, additive terms inner first, fill)."""
    fill = None
    filled = _fill_of(node) if _readers(node) == 1 else None
    if filled is not None:
        chain.append(node)
        fill, node = filled
    additive: list[fx.Node] = []
    while isinstance(node, fx.Node) and _readers(node) == 1 and op_kind(node) == "add" and len(node.args) == 2 \
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args):
        left, right = node.args
        scores_side, term = (left, right) if _reaches_product(left) else (right, left)
        if not _reaches_product(scores_side):
            return None
        additive.insert(0, term)
        chain.append(node)
        node = scores_side
    scale = 1.0
    while isinstance(node, fx.Node) and _readers(node) == 1 and (scaled := _scale_of(node)) is not None:
        scale *= scaled[0]
        chain.append(node)
        node = scaled[1]
    if not isinstance(node, fx.Node) or _readers(node) != 1:
        return None
    product = _product(node)
    if product is None:
        return None
    chain.append(node)
    if product.transposed_k is not None and product.transposed_k.op in ("call_function", "call_method"):
        chain.append(product.transposed_k)
    if product.bias is not None:
        additive.insert(0, product.bias)
    return product, scale * product.scale, additive, fill


# --- the values side and the whole match ----------------------------------------------------------------


def _is_eval_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if module_of(gm, node, nn.Dropout) is not None:
        return True
    if op_kind(node) != "dropout":
        return False
    training = _arg(node, 2, "train" if node.target is aten.dropout.default else "training", True)
    return training is False


def _last_axis(node: fx.Node, dim: object) -> bool:
    ndim = tensor_ndim(node)
    return isinstance(dim, int) and (dim == -1 or (ndim is not None and dim == ndim - 1))


def _values(node: fx.Node, probs: fx.Node) -> tuple[_Operand, list[int] | None] | None:
    kind = op_kind(node)
    if kind == "matmul" and len(node.args) == 2 and node.args[0] is probs and isinstance(node.args[1], fx.Node):
        return _Operand(node.args[1]), None
    if kind == "einsum":
        return _einsum_values(node, probs)
    return None


def _skip_full_slices(node: object) -> object:
    """``x[:, :]`` is ``x``: ATen records each ``:`` of an indexing as a full slice."""
    while isinstance(node, fx.Node) and node.target is aten.slice.Tensor and tuple(node.args[2:]) in (
            (), (0,), (0, 9223372036854775807), (None, None)) and node.kwargs.get("step", 1) == 1:
        node = node.args[0]
    return node


def _same(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and [str(s) for s in a] == [str(s) for s in b]


def _grouped_source(node: fx.Node) -> fx.Node | None:
    """X ``[B, Hkv, T, d]`` when ``node`` repeats each of X's heads in place (``repeat_interleave`` on the
    heads axis, or Llama's ``repeat_kv``: ``x[:, :, None].expand(B, Hkv, n, T, d).reshape(B, Hkv * n, T, d)``),
    which is what SDPA's ``enable_gqa`` does itself."""
    if tensor_ndim(node) != 4:
        return None
    if op_kind(node) is None and "repeat_interleave" in str(node.target) and _arg(node, 2, "dim") == 1:
        return node.args[0]
    if node.target not in (aten.reshape.default, aten.view.default):
        return None
    expand = _skip_full_slices(node.args[0])
    if not (isinstance(expand, fx.Node) and expand.target is aten.expand.default):
        return None
    unsqueeze = _skip_full_slices(expand.args[0])
    if not (isinstance(unsqueeze, fx.Node) and unsqueeze.target is aten.unsqueeze.default
            and unsqueeze.args[1] % 5 == 2):
        return None
    source = _skip_full_slices(unsqueeze.args[0])
    shape, grouped, out = tensor_shape(source), tensor_shape(expand), tensor_shape(node)
    if shape is None or grouped is None or len(grouped) != 5:
        return None
    heads_kept = _same(shape, (*grouped[:2], *grouped[3:]))
    return source if heads_kept and _same((out[0], *out[2:]), (shape[0], *shape[2:])) else None


def _ungroup(match: _Match) -> None:
    """Read K and V before their heads were repeated, with ``enable_gqa``, when both were repeated alike."""
    if match.k.perm is not None or match.v.perm is not None:
        return
    k, v = _grouped_source(match.k.node), _grouped_source(match.v.node)
    if k is None or v is None:
        return
    match.chain += [match.k.node, match.v.node]
    match.k, match.v, match.grouped = _Operand(k), _Operand(v), True


def _shape_after(operand: _Operand) -> list[str] | None:
    shape = tensor_shape(operand.node)
    if shape is None:
        return None
    shape = [str(s) for s in shape]
    return [shape[i] for i in operand.perm] if operand.perm else shape


def _consistent(match: _Match, output: fx.Node) -> bool:
    q, k, v = (_shape_after(o) for o in (match.q, match.k, match.v))
    if q is None or k is None or v is None or not len(q) == len(k) == len(v) >= 3:
        return False
    if q[:-2] != k[:-2] or k[:-2] != v[:-2] or q[-1] != k[-1] or k[-2] != v[-2]:
        return False
    dtype = tensor_dtype(match.q.node)
    dtypes = {dtype, tensor_dtype(match.k.node), tensor_dtype(match.v.node), tensor_dtype(output)}
    dtypes |= {tensor_dtype(m) for m in match.additive}
    return dtype is not None and dtype.is_floating_point and dtypes == {dtype}


def _match(gm: fx.GraphModule, softmax: fx.Node) -> _Match | None:
    if op_kind(softmax) != "softmax" or not _last_axis(softmax, _arg(softmax, 1, "dim")):
        return None
    chain = [softmax]
    probs, after = softmax, only_user(softmax)
    while after is not None and after.args and after.args[0] is probs and (
            op_kind(after) == "cast" or _is_eval_dropout(gm, after)):
        chain.insert(0, after)
        probs, after = after, only_user(after)
    found = _values(after, probs) if after is not None else None
    if found is None:
        return None
    v, out_perm = found
    chain.insert(0, after)
    node = softmax.args[0]
    while isinstance(node, fx.Node) and op_kind(node) == "cast" and _readers(node) == 1:
        chain.append(node)
        node = node.args[0]
    scores = _scores(node, chain) if isinstance(node, fx.Node) else None
    if scores is None:
        return None
    product, scale, additive, fill = scores
    match = _Match(product.q, product.k, v, scale, additive, fill, out_perm, chain, product.spelled)
    match.causal = _is_causal(match)
    if match.causal:  # the mask is no longer read: its slices go with the pattern
        mask = match.fill.keep or match.fill.blocked
        while isinstance(mask, fx.Node) and mask.op == "call_function":
            chain.append(mask)
            mask = mask.args[0]
    _ungroup(match)
    if not _consistent(match, after) and not (match.grouped and _consistent_grouped(match, after)):
        return None
    return match if _exact(match) else None


def _consistent_grouped(match: _Match, output: fx.Node) -> bool:
    q, k, v = (_shape_after(o) for o in (match.q, match.k, match.v))
    if q is None or k is None or v is None or not len(q) == len(k) == len(v) == 4:
        return False
    return q[0] == k[0] == v[0] and k[1] == v[1] and q[-1] == k[-1] and k[-2] == v[-2] and \
        tensor_dtype(match.q.node) == tensor_dtype(match.k.node) == tensor_dtype(output)


# --- exactness on fully masked rows ---------------------------------------------------------------------


def _fill_in_dtype(match: _Match) -> float:
    """The fill value as the scores' dtype stores it (``-1e9`` is ``-inf`` in fp16)."""
    dtype = tensor_dtype(match.q.node) or torch.float32
    return float(torch.tensor(match.fill.value, dtype=torch.float64).to(dtype))


def _exact(match: _Match) -> bool:
    if match.fill is None:
        return True
    value = _fill_in_dtype(match)
    if math.isnan(value) or value == math.inf or (math.isfinite(value) and value > LARGE_NEGATIVE):
        return False
    return not match.additive or all(_finite_by_construction(m) for m in match.additive)


_FINITE_KEEPING = {
    aten.slice.Tensor, aten.unsqueeze.default, aten.expand.default, aten.view.default, aten.reshape.default,
    aten.select.int, aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
    aten.squeeze.dim, aten.permute.default, aten.transpose.int, aten.index.Tensor,
}
_FINITE_MAKERS = {aten.zeros.default, aten.ones.default, aten.zeros_like.default, aten.ones_like.default,
                  aten.new_zeros.default, aten.new_ones.default, torch.zeros, torch.ones, torch.zeros_like}


def _finite_by_construction(node: object, depth: int = 0) -> bool:
    """True when ``node``'s values are finite whatever the inputs (conservative: False when unsure)."""
    if _number(node):
        return math.isfinite(node)
    if not isinstance(node, fx.Node) or depth > 12:
        return False
    if node.op == "get_attr":  # a constant or buffer of the model: look at its values
        tensor = node_value(node)
        return tensor is not None and bool(torch.isfinite(tensor).all())
    if node.op != "call_function":
        return False
    if node.target in _FINITE_MAKERS:
        return True
    if node.target in _FINITE_KEEPING:
        return _finite_by_construction(node.args[0], depth + 1)
    kind = op_kind(node)
    if kind == "masked_fill":
        return _finite_by_construction(node.args[0], depth + 1) and _finite_by_construction(node.args[2], depth + 1)
    if kind == "where" or node.target is aten.where.ScalarSelf:
        return all(_finite_by_construction(a, depth + 1) for a in node.args[1:3])
    return False


def _may_be_all_neg_inf(match: _Match) -> bool:
    return bool(match.additive) and match.fill is None and not all(_finite_by_construction(m)
                                                                   for m in match.additive)


def _sliced_square(node: object) -> tuple[fx.Node, object] | None:
    """``(buffer, t)`` when ``node`` is ``buffer[..., :t, :t]`` (ATen slices, the other axes whole)."""
    ends: dict[int, object] = {}
    ndim = tensor_ndim(node)
    while isinstance(node, fx.Node) and node.target is aten.slice.Tensor and ndim is not None:
        dim, start = node.args[1] % ndim, (node.args[2] if len(node.args) > 2 else 0)
        end = node.args[3] if len(node.args) > 3 else None
        if node.kwargs.get("step", 1) != 1 or start not in (0, None):
            return None
        if dim >= ndim - 2 and end is not None:
            ends[dim] = end
        elif end not in (None, 9223372036854775807):
            return None
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "get_attr") or set(ends) != {ndim - 2, ndim - 1}:
        return None
    return (node, ends[ndim - 1]) if str(ends[ndim - 2]) == str(ends[ndim - 1]) else None


def _is_causal(match: _Match) -> bool:
    """True when the only mask keeps key j for query i exactly when j <= i: a lower-triangular buffer sliced to
    the sequence length (GPT-2's ``bias[:, :, :T, :T]``), with as many queries as keys."""
    if match.fill is None or match.additive:
        return False
    keep = match.fill.keep
    if keep is None and op_kind(match.fill.blocked) is None and str(getattr(match.fill.blocked, "target", "")) in (
            "aten.bitwise_not.default", "aten.logical_not.default"):
        keep = match.fill.blocked.args[0]
    found = _sliced_square(keep)
    q, k, kept = tensor_shape(match.q.node), tensor_shape(match.k.node), tensor_shape(keep)
    if found is None or q is None or k is None or kept is None or not _same(q[-2:-1], k[-2:-1]):
        return False
    if not _same(kept[-2:], (q[-2], q[-2])):
        return False
    buffer = node_value(found[0])
    if buffer is None or buffer.dim() < 2 or buffer.shape[-1] != buffer.shape[-2] or buffer[..., :1, :1].numel() != 1:
        return False
    square = buffer.reshape(buffer.shape[-2:]) != 0
    return bool(torch.equal(square, torch.ones_like(square).tril()))


def node_value(node: fx.Node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (a buffer or constant of the captured module)."""
    value = node.graph.owning_module
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if torch.is_tensor(value) else None


# --- rewriting ------------------------------------------------------------------------------------------


def _emit(graph: fx.Graph, operand: _Operand) -> fx.Node:
    return graph.call_function(torch.permute, (operand.node, operand.perm)) if operand.perm else operand.node


def _rewrite(gm: fx.GraphModule, match: _Match) -> fx.Node:
    graph = gm.graph
    output = match.chain[0]
    with graph.inserting_before(output):
        q, k, v = (_emit(graph, o) for o in (match.q, match.k, match.v))
        bias = None
        for term in match.additive:
            bias = term if bias is None else graph.call_function(operator.add, (bias, term))
        mask, blocked = bias, None
        if match.fill is not None and not match.causal:
            blocked = match.fill.blocked or graph.call_function(torch.logical_not, (match.fill.keep,))
            if bias is None:
                mask = match.fill.keep or graph.call_function(torch.logical_not, (blocked,))
            else:
                mask = graph.call_function(torch.masked_fill, (bias, blocked, -math.inf))
        kwargs = {"attn_mask": mask, "dropout_p": 0.0, "scale": match.scale}
        if match.causal:  # the diagonal is always kept: no row is fully masked
            kwargs["is_causal"] = True
        if match.grouped:
            kwargs["enable_gqa"] = True
        fused = graph.call_function(F.scaled_dot_product_attention, (q, k, v), kwargs)
        row = None
        if blocked is not None:
            whole_row = graph.call_method("all", (blocked, -1), {"keepdim": True})
            row = math.nan if not math.isfinite(_fill_in_dtype(match)) else _row_mean(graph, match, v)
        elif _may_be_all_neg_inf(match):
            whole_row = graph.call_method("all", (graph.call_function(torch.isneginf, (bias,)), -1), {"keepdim": True})
            row = math.nan
        if row is not None:
            fused = graph.call_function(torch.where, (whole_row, row, fused))
        if match.out_perm:
            fused = graph.call_function(torch.permute, (fused, match.out_perm))
    fused.meta = dict(output.meta)
    output.replace_all_uses_with(fused)
    erase_unused(gm, match.chain)
    return fused


def _row_mean(graph: fx.Graph, match: _Match, v: fx.Node) -> fx.Node:
    """What a row gets when a finite fill replaced all its scores: the plain mean of V over the keys."""
    if match.grouped:
        q_heads = graph.call_function(operator.getitem, (graph.call_method("size", (match.q.node,)), 1))
        v = graph.call_method("repeat_interleave", (v, graph.call_function(
            operator.floordiv, (q_heads, graph.call_function(operator.getitem,
                                                             (graph.call_method("size", (v,)), 1))))), {"dim": 1})
    return graph.call_method("mean", (v, -2), {"keepdim": True})


def fuse_attention(gm: fx.GraphModule) -> list[Rewrite]:
    """Replace every matched attention with ``F.scaled_dot_product_attention``; returns the rewrites."""
    rewrites = []
    for softmax in list(gm.graph.nodes):
        if softmax.graph is not gm.graph:
            continue  # erased by an earlier rewrite
        match = _match(gm, softmax)
        if match is None:
            continue
        fused = _rewrite(gm, match)
        masks = ", ".join(filter(None, [
            f"{len(match.additive)} additive" if match.additive else "",
            "is_causal" if match.causal else f"fill {match.fill.value:g}" if match.fill else "",
            "grouped K/V" if match.grouped else "",
        ])) or "no mask"
        detail = f"{match.spelled} attention ({masks}, scale {match.scale:.4g}) -> scaled_dot_product_attention"
        rewrites.append(Rewrite(NAME, module_path(fused), detail))
    if rewrites:
        finish(gm)
    return rewrites
