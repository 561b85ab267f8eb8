"""A ``model.pt2`` (a ``torch.export`` archive) is opened only after every member has been checked.

``torch.export.load`` trusts its input: it unpickles three kinds of members (``data/sample_inputs/<m>.pt``,
retried with ``weights_only=False`` when the safe load fails; constants named ``opaque_obj_*`` / ``custom_obj_*``
or flagged ``use_pickle``; the legacy ``data/weights/<m>.pt`` / ``data/constants/<m>.pt``), it passes every
``expr_str`` of the program's symbolic shapes to ``sympy.sympify``, which is ``eval`` (a crafted ``expr_str``
runs a shell command during the load), and it resolves node targets by walking attributes of ``torch``, so a
node could call ``torch.hub.load``. `check_program_archive` therefore admits only:

- the members an archive of plain tensors has: format/version markers, ``models/<m>.json``, the weight and
  constant configs with raw ``weight_N`` / ``tensor_N`` files (no pickle flag anywhere), sample inputs that
  ``torch.load(weights_only=True)`` reads (so torch never falls back to full unpickling);
- node targets and operator arguments that are registered ops of known namespaces (``torch.ops.aten...``)
  or a short list of arithmetic from ``operator`` / ``math``;
- symbolic-shape expressions made of names, numbers, arithmetic and a list of sympy functions, checked on
  their Python syntax tree before sympy ever sees them.

Anything else is refused in one line naming the member. Why by hand: torch offers no verifying loader for
this format (``weights_only`` covers only ``torch.load``), and the ONNX / safetensors paths need none.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from fullchain.errors import UserError

MAX_MEMBERS = 100_000
MAX_JSON_BYTES = 256 << 20
_NAME = r"[A-Za-z_]\w*"
_MEMBERS = [re.compile(p) for p in (
    r"archive_format", r"archive_version", r"byteorder", r"\.data/version", r"\.data/serialization_id",
    rf"models/{_NAME}\.json",
    rf"data/weights/{_NAME}_weights_config\.json", r"data/weights/weight_\d+",
    rf"data/constants/{_NAME}_constants_config\.json", r"data/constants/tensor_\d+",
    rf"data/sample_inputs/{_NAME}\.pt",
)]
_PAYLOAD = re.compile(r"^(weight|tensor)_\d+$")
_OP_NAMESPACES = ("aten", "prims", "quantized_decomposed", "quantized", "onednn", "higher_order")
_OPERATOR = re.compile(rf"^torch\.ops\.({'|'.join(_OP_NAMESPACES)})\.\w+(\.\w+)?$")
_PY_FUNCTIONS = {
    "_operator": {"getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
                  "and_", "or_", "xor", "not_", "invert", "eq", "ne", "lt", "le", "gt", "ge", "lshift", "rshift",
                  "matmul", "index"},
    "math": {"ceil", "floor", "trunc", "sqrt", "exp", "log", "log2", "sin", "cos", "tanh", "isfinite", "pow"},
}
# sympy functions that torch's symbolic shapes print (torch.utils._sympy.functions and sympy's own).
_SYMPY_CALLS = {
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And",
    "Or", "Not", "Piecewise", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "CeilToInt", "FloorToInt",
    "sqrt", "floor", "ceiling", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or",
}
_SAFE_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Load, ast.operator,
               ast.unaryop, ast.cmpop, ast.boolop, ast.Call, ast.keyword, ast.Name, ast.Constant, ast.Tuple)
MAX_EXPR_CHARS = 2000
MAX_EXPONENT = 64


def _refuse(path: Path, why: str) -> UserError:
    return UserError(f"{path}: refusing to load this program: {why}")


def check_expression(text: str) -> str | None:
    """Why a symbolic-shape expression is unsafe to hand to sympy, or None when it is plain arithmetic."""
    if len(text) > MAX_EXPR_CHARS:
        return f"a symbolic expression of {len(text)} characters"
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return f"symbolic expression {text[:60]!r} is not an arithmetic expression"
    for node in ast.walk(tree):
        if not isinstance(node, _SAFE_NODES):
            return f"symbolic expression {text[:60]!r} contains {type(node).__name__}"
        if isinstance(node, ast.Name) and (node.id.startswith("_") or not node.id.isidentifier()):
            return f"symbolic expression {text[:60]!r} uses the name {node.id!r}"
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
            return f"symbolic expression {text[:60]!r} calls something other than a sympy shape function"
        if isinstance(node, ast.keyword) and not isinstance(node.value, ast.Constant):
            return f"symbolic expression {text[:60]!r} has a computed keyword argument"
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and abs(node.value) > 2**63:
            return f"symbolic expression {text[:60]!r} has an oversized number"
        exponent = (node.right if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)
                    else node.args[1] if isinstance(node, ast.Call) and getattr(node.func, "id", "") in
                    ("PowByNatural", "FloatPow") and len(node.args) == 2 else None)
        if exponent is not None and not (isinstance(exponent, ast.Constant) and isinstance(exponent.value, int)
                                         and abs(exponent.value) <= MAX_EXPONENT):
            return f"symbolic expression {text[:60]!r} raises to a power other than a small integer"
    return None


def check_target(target: Any) -> str | None:
    """Why a node's target (or an operator argument) is not a plain registered op, or None."""
    if not isinstance(target, str):
        return f"a node target of type {type(target).__name__}"
    if _OPERATOR.match(target):
        return None
    module, _, name = target.partition(".")
    if name in _PY_FUNCTIONS.get(module, ()):
        return None
    return f"the graph calls {target[:80]!r}, which is not a registered tensor op"


def _check_program_json(tree: Any) -> str | None:
    """Walk the serialized program: node targets, operator arguments, symbolic expressions, custom objects."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        if "target" in node and "inputs" in node and "outputs" in node and (why := check_target(node["target"])):
            return why
        for key, value in node.items():
            if key == "as_operator" and (why := check_target(value)):
                return why
            if key == "expr_str" and (why := check_expression(value) if isinstance(value, str)
                                      else "a non-text symbolic expression"):
                return why
            if key == "as_custom_obj":
                return "the program holds a custom (pickled) object"
            if isinstance(value, dict | list):
                stack.append(value)
    return None


def _check_payload_config(archive: zipfile.ZipFile, name: str) -> str | None:
    entries = json.loads(archive.read(name)).get("config", {})
    if not isinstance(entries, dict):
        return f"{name} is not a payload table"
    for key, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            return f"{name}: entry {str(key)[:60]!r} is pickled"
        if not _PAYLOAD.match(str(entry.get("path_name", ""))):
            return f"{name}: entry {str(key)[:60]!r} points at {str(entry.get('path_name'))[:60]!r}"
    return None


def _check_sample_inputs(archive: zipfile.ZipFile, name: str) -> str | None:
    raw = archive.read(name)
    if not raw:
        return None
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means torch would retry with full unpickling
        return f"{name} needs full unpickling ({type(exc).__name__})"
    return None


def load_program(path: str | Path, compile: bool = True):
    """Load ``model.pt2`` (an artifact dir or the file), once `check_program_archive` admitted it, as a
    `FrozenProgram` (compiled per input shape) or, with ``compile=False``, the plain graph module."""
    from fullchain.optimize.quantize.pt2e import PROGRAM_FILE, FrozenProgram, register_ops

    path = Path(path)
    if path.is_dir():
        path = path / PROGRAM_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such file; expected a quantised artifact written with --backend inductor")
    check_program_archive(path)
    register_ops()
    module = torch.export.load(str(path)).module()
    return FrozenProgram(module) if compile else module


def check_program_archive(path: str | Path) -> None:
    """Raise `UserError` unless every member of the archive at `path` is safe to load (see the module docstring)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if not infos or len(infos) > MAX_MEMBERS:
                raise _refuse(path, f"{len(infos)} members")
            root = infos[0].filename.partition("/")[0]
            for info in infos:
                top, _, rest = info.filename.partition("/")
                if top != root or not any(p.fullmatch(rest) for p in _MEMBERS):
                    raise _refuse(path, f"unexpected member {info.filename[:100]!r} (only plain tensors and the "
                                        "program's JSON are accepted)")
                if rest.endswith((".json", ".pt")) and info.file_size > MAX_JSON_BYTES:
                    raise _refuse(path, f"{info.filename} is {info.file_size} bytes")
            for info in infos:
                rest = info.filename.partition("/")[2]
                why = None
                if rest.endswith("_config.json"):
                    why = _check_payload_config(archive, info.filename)
                elif rest.startswith("models/"):
                    why = _check_program_json(json.loads(archive.read(info.filename)))
                elif rest.startswith("data/sample_inputs/"):
                    why = _check_sample_inputs(archive, info.filename)
                if why:
                    raise _refuse(path, why)
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _refuse(path, f"not a well-formed torch.export archive ({type(exc).__name__})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
