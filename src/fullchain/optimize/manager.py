"""The pass manager: runs graph passes in order and keeps only those that leave the outputs unchanged.

After each pass the rewritten graph runs on the sample inputs and is compared with the original
model's outputs (`fullchain.optimize.parity`). A pass that raises, or whose error exceeds the
tolerance, is rolled back (the graph from before the pass is restored) with a warning, and the
report says so; later passes still run. Nothing here mutates the model it was given.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fullchain.errors import UserError
from fullchain.optimize.capture import annotate_shapes, capture
from fullchain.optimize.parity import Parity, compare
from fullchain.optimize.passes import PASSES, Rewrite


class PassRolledBack(UserWarning):
    """A pass changed the outputs beyond tolerance (or failed) and was undone."""


@dataclass
class PassOutcome:
    name: str
    status: str  # "applied", "no-match", "rolled-back"
    rewrites: list[Rewrite] = field(default_factory=list)
    parity: Parity | None = None
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "status": self.status,
            "rewrites": [r.to_json() for r in self.rewrites],
            "parity": self.parity.to_json() if self.parity else None,
            "error": self.error,
            "seconds": round(self.seconds, 4),
        }


def resolve_pass_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """``["all"]`` -> every pass in registry order, ``[]`` or ``["none"]`` -> none; unknown names are a user error
    naming the known ones."""
    if list(names) == ["all"]:
        return list(PASSES)
    if list(names) in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise UserError(f"unknown pass {unknown[0]!r}; known passes: all, {', '.join(PASSES)}")
    return list(names)


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...]):
    with torch.no_grad():
        return model(*inputs)


class PassManager:
    """Apply ``passes`` to a model captured with ``example_inputs``; see the module docstring."""

    def __init__(self, passes: list[str] | tuple[str, ...] = ("all",), tolerance: tuple[float, float] | None = None):
        self.pass_names = resolve_pass_names(passes)
        self.tolerance = tolerance

    def run(
        self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]
    ) -> tuple[nn.Module, list[PassOutcome]]:
        """The rewritten graph and each pass's outcome; with no passes, the model itself (nothing to capture)."""
        if not self.pass_names:
            return model.eval(), []
        reference = _run(model.eval(), example_inputs)
        gm = capture(model, example_inputs)
        outcomes = []
        for name in self.pass_names:
            backup = copy.deepcopy(gm)
            started = time.perf_counter()
            outcome = PassOutcome(name, "applied")
            try:
                outcome.rewrites = PASSES[name](gm)
                if outcome.rewrites:
                    annotate_shapes(gm, example_inputs)
                    outcome.parity = compare(_run(gm, example_inputs), reference, tolerance=self.tolerance)
            except Exception as exc:  # a pass bug must not cost the user the model
                outcome.error = f"{type(exc).__name__}: {exc}"
            outcome.seconds = time.perf_counter() - started
            if outcome.error or (outcome.parity is not None and not outcome.parity.ok):
                outcome.status = "rolled-back"
                gm = backup
                why = outcome.error or (f"max abs error {outcome.parity.max_abs:.3g} exceeds "
                                        f"atol {outcome.parity.atol:g} + rtol {outcome.parity.rtol:g}")
                warnings.warn(f"{name}: rolled back ({why})", PassRolledBack, stacklevel=2)
            elif not outcome.rewrites:
                outcome.status = "no-match"
            outcomes.append(outcome)
        return gm, outcomes


def replay(model: nn.Module, pass_names: list[str], example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Rebuild the rewritten graph structure of an optimised artifact: capture, then the same passes.

    The passes are deterministic, so this yields the same modules and parameter names that were saved;
    the saved weights are then loaded on top. No parity check: the weights it runs with are not loaded yet.
    """
    gm = capture(model, example_inputs)
    for name in resolve_pass_names(pass_names):
        PASSES[name](gm)
    return gm
