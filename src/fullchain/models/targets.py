"""User model code named by ``target: "package.module:Name"``, and when fullchain may run it.

Importing a module runs its top-level code and calling a builder runs the builder, so who chose the target
decides what is allowed:

- **A run file** (``model.target``, ``--set model.target=...``) is the user's own: its target may name a
  ``torch.nn.Module`` subclass or a factory function of the user's code.
- **A model directory** (``builder.target`` in model.json) is somebody else's until the user says otherwise:
  its target is not even imported unless the user passes ``--trust-code`` (in the spirit of Hugging Face's
  ``trust_remote_code``) or lists the target's top-level package in ``FULLCHAIN_TRUSTED_MODULES``
  (comma-separated, e.g. ``FULLCHAIN_TRUSTED_MODULES=mymodels,lab_nets``), which suits servers and CI.

Whoever chose it, a target is refused before anything is imported or called when it points into the Python
standard library (``os:system``, ``subprocess:getoutput``, ``pathlib:Path.touch``) or walks dunder attributes;
after import, the object must be an ``nn.Module`` subclass or a plain Python function that is not defined in
the standard library or in torch (``torch.hub.load`` downloads and runs code), checked before it is called;
what a factory returns must be a module (checked by the caller, `fullchain.models.registry.build_model`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from fullchain.errors import UserError, one_line

TRUST_ENV = "FULLCHAIN_TRUSTED_MODULES"
TRUST_FLAG = "--trust-code"
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ATTR = re.compile(r"^[A-Za-z_]\w*$")
# Packages whose functions must never serve as a model factory even though they are not the standard library.
_FORBIDDEN_FUNCTION_PACKAGES = frozenset({"torch", "fullchain"})


@dataclass(frozen=True)
class TargetOrigin:
    """Who named a target: a run file (the user's own code) or a model directory (trusted only on request)."""

    source: str  # the run file or the model.json path, for messages
    from_artifact: bool = False
    trust_code: bool = False

    def label(self, target: str) -> str:
        field = "builder.target" if self.from_artifact else "model.target"
        return f"{self.source}: {field} {target!r}"


RUN_FILE = TargetOrigin("run file")


def _top_package(module_name: str) -> str:
    return module_name.partition(".")[0]


def is_standard_library(module_name: str) -> bool:
    top = _top_package(module_name)
    return top in sys.stdlib_module_names or top in ("builtins", "__main__")


def trusted_packages() -> set[str]:
    """Top-level packages named in ``FULLCHAIN_TRUSTED_MODULES``."""
    return {p.strip() for p in os.environ.get(TRUST_ENV, "").split(",") if p.strip()}


def parse_target(target: str, label: str) -> tuple[str, list[str]]:
    """``"pkg.mod:Outer.Inner"`` -> ``("pkg.mod", ["Outer", "Inner"])``, refusing anything else."""
    module_name, sep, attr_path = target.partition(":")
    parts = attr_path.split(".") if attr_path else []
    if not sep or not _MODULE.match(module_name) or not parts or not all(_ATTR.match(p) for p in parts):
        raise UserError(f"{label} must look like 'package.module:ClassName'")
    if any(p.startswith("__") for p in parts):
        raise UserError(f"{label}: dunder attributes cannot name a model builder")
    return module_name, parts


def _check_before_import(module_name: str, origin: TargetOrigin, label: str) -> None:
    if is_standard_library(module_name):
        raise UserError(f"{label}: the Python standard library ({_top_package(module_name)!r}) holds no model "
                        "builders; name an nn.Module subclass or a factory function of your own package")
    if origin.from_artifact and not origin.trust_code and _top_package(module_name) not in trusted_packages():
        raise UserError(
            f"{label}: loading this model would import and run code the model directory chose; if you trust it, "
            f"pass {TRUST_FLAG} (or add {_top_package(module_name)!r} to {TRUST_ENV})"
        )


def _check_builder(obj: Any, label: str) -> None:
    """An nn.Module subclass, or a plain Python function outside the standard library and torch."""
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise UserError(f"{label}: {obj.__qualname__} is a class but not a torch.nn.Module")
        return
    if not inspect.isfunction(obj):
        kind = "built-in function" if inspect.isbuiltin(obj) else type(obj).__name__
        raise UserError(f"{label} is a {kind}, not an nn.Module subclass or a Python function returning one")
    defined_in = getattr(obj, "__module__", None) or ""
    if is_standard_library(defined_in) or _top_package(defined_in) in _FORBIDDEN_FUNCTION_PACKAGES:
        raise UserError(f"{label}: {defined_in}.{obj.__qualname__} is not a model factory of your own code")


def resolve_target(target: str, origin: TargetOrigin = RUN_FILE) -> Callable[..., Any]:
    """The class or factory `target` names, after every check that can run before it is called."""
    label = origin.label(target)
    module_name, parts = parse_target(target, label)
    _check_before_import(module_name, origin, label)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, but also any error raised while the user's module runs
        raise UserError(
            f"{label}: cannot import module {module_name!r} ({one_line(exc)}); "
            "check the name and that its folder is on PYTHONPATH (or installed)"
        ) from exc
    obj: Any = module
    for part in parts:
        if not hasattr(obj, part):
            raise UserError(f"{label}: module {module_name!r} has no attribute {'.'.join(parts)!r}")
        obj = getattr(obj, part)
    _check_builder(obj, label)
    return obj
