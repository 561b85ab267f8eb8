"""The pass manager: runs graph passes in order and keeps only those that leave the outputs unchanged and the
model no slower.

The model is captured once (`fullchain.optimize.capture`: whole, or module by module where the whole fails)
and every pass runs over every captured graph. After each pass the model runs on the sample inputs and on
the edge inputs (`fullchain.optimize.parity.edge_inputs`: padding-only rows, single tokens, the longest
length) and is compared with the original model's outputs, NaN positions included. A pass that raises, or
whose error exceeds the tolerance on any of them, is rolled back (the model from before the pass is
restored) with a warning. A pass that passes parity is then timed against the model from before it,
alternately, on the timing inputs (`fullchain.optimize.measure.paired_latency`); if the median of the
per-round ratios says it is slower by more than the noise margin, and a second, longer measurement agrees,
it is rolled back too, and the outcome says so with the figures. Later passes still run. Nothing here
mutates the model it was given.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fullchain.errors import UserError
from fullchain.optimize.capture import Captured, capture_model
from fullchain.optimize.measure import PairedLatency, paired_latency
from fullchain.optimize.parity import Parity, compare
from fullchain.optimize.passes import PASSES, Rewrite

Inputs = tuple[torch.Tensor, ...]
NOISE_MARGIN = 0.10  # a pass is slower only when the median per-round ratio exceeds 1 + this
LATENCY_ROUNDS = 7


class PassRolledBack(UserWarning):
    """A pass changed the outputs beyond tolerance, failed, or slowed the model, and was undone."""


@dataclass
class PassOutcome:
    name: str
    status: str  # "applied", "no-match", "rolled-back"
    rewrites: list[Rewrite] = field(default_factory=list)
    parity: Parity | None = None
    error: str | None = None
    seconds: float = 0.0
    reason: str | None = None  # why it was rolled back: "error", "parity" or "slower"
    latency: PairedLatency | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "status": self.status,
            "reason": self.reason,
            "rewrites": [r.to_json() for r in self.rewrites],
            "parity": self.parity.to_json() if self.parity else None,
            "latency": self.latency.to_json() if self.latency else None,
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


def _run(model: nn.Module, inputs: Inputs):
    with torch.no_grad():
        return model(*inputs)


def _worst(parities: list[Parity]) -> Parity:
    failed = [p for p in parities if not p.ok]
    return max(failed or parities, key=lambda p: (p.max_abs, p.max_rel))


def _apply(name: str, root: nn.Module, paths: list[str]) -> list[Rewrite]:
    """Run pass ``name`` over every captured graph of ``root``; rewrites name their place in the whole model."""
    rewrites = []
    for path in paths:
        for r in PASSES[name](root.get_submodule(path)):
            rewrites.append(replace(r, where=f"{path}.{r.where}") if path else r)
    return rewrites


class PassManager:
    """Apply ``passes`` to a model captured with ``example_inputs``; see the module docstring.

    ``latency_guard=False`` keeps every pass that passes parity without timing it (replay and tests of
    rewrites alone). After `run`, ``captured`` tells which modules were captured and which could not be.
    """

    def __init__(self, passes: list[str] | tuple[str, ...] = ("all",), tolerance: tuple[float, float] | None = None,
                 latency_guard: bool = True, margin: float = NOISE_MARGIN, rounds: int = LATENCY_ROUNDS):
        self.pass_names = resolve_pass_names(passes)
        self.tolerance = tolerance
        self.latency_guard = latency_guard
        self.margin = margin
        self.rounds = rounds
        self.captured: Captured | None = None

    def run(self, model: nn.Module, example_inputs: Inputs, probes: list[Inputs] | tuple[Inputs, ...] = (),
            timing_inputs: Inputs | None = None) -> tuple[nn.Module, list[PassOutcome]]:
        """The rewritten model and each pass's outcome; with no passes, the model itself (nothing to capture).

        ``probes`` are further parity inputs (edge cases); ``timing_inputs`` what the latency guard times
        (default: the example inputs).
        """
        if not self.pass_names:
            return model.eval(), []
        model = model.eval()
        checks = [(inputs, _run(model, inputs)) for inputs in [tuple(example_inputs), *map(tuple, probes)]]
        self.captured = capture_model(model, example_inputs)
        root, paths = self.captured.module, list(self.captured.graphs)
        timing = tuple(timing_inputs) if timing_inputs is not None else tuple(example_inputs)
        outcomes = []
        for name in self.pass_names:
            backup = copy.deepcopy(root)
            started = time.perf_counter()
            outcome = PassOutcome(name, "applied")
            try:
                outcome.rewrites = _apply(name, root, paths)
                if outcome.rewrites:
                    outcome.parity = _worst([compare(_run(root, inputs), want, tolerance=self.tolerance)
                                             for inputs, want in checks])
                    if outcome.parity.ok and self.latency_guard:
                        outcome.latency = self._time(backup, root, timing)
            except Exception as exc:  # a pass bug must not cost the user the model
                outcome.error = f"{type(exc).__name__}: {exc}"
            outcome.seconds = time.perf_counter() - started
            outcome.reason = self._reason(outcome)
            if outcome.reason:
                outcome.status = "rolled-back"
                root = backup
                warnings.warn(f"{name}: rolled back ({self._why(outcome)})", PassRolledBack, stacklevel=2)
            elif not outcome.rewrites:
                outcome.status = "no-match"
            outcomes.append(outcome)
        self.captured.module = root
        return root, outcomes

    def _time(self, before: nn.Module, after: nn.Module, inputs: Inputs) -> PairedLatency:
        """Alternating timings; a first verdict of "slower" is confirmed by a second, longer measurement."""
        with torch.inference_mode():
            first = paired_latency(lambda: before(*inputs), lambda: after(*inputs), rounds=self.rounds)
            if first.ratio <= 1 + self.margin:
                return first
            second = paired_latency(lambda: before(*inputs), lambda: after(*inputs), rounds=2 * self.rounds)
            return min(first, second, key=lambda t: t.ratio)

    def _reason(self, outcome: PassOutcome) -> str | None:
        if outcome.error:
            return "error"
        if outcome.parity is not None and not outcome.parity.ok:
            return "parity"
        if outcome.latency is not None and outcome.latency.ratio > 1 + self.margin:
            return "slower"
        return None

    def _why(self, outcome: PassOutcome) -> str:
        if outcome.reason == "error":
            return outcome.error
        if outcome.reason == "parity":
            p = outcome.parity
            return f"max abs error {p.max_abs:.3g} exceeds atol {p.atol:g} + rtol {p.rtol:g}"
        t = outcome.latency
        return (f"{t.ratio:.2f}x the latency before it (median of {t.rounds} alternating rounds, "
                f"{t.before_ms:.3g} -> {t.after_ms:.3g} ms, {t.threads} threads; margin {self.margin:.0%})")


def replay(model: nn.Module, pass_names: list[str], example_inputs: Inputs) -> nn.Module:
    """Rebuild the rewritten structure of an optimised artifact: capture, then the same passes.

    Capture and passes are deterministic, so this yields the same modules and parameter names that were
    saved; the saved weights are then loaded on top. No parity check or timing: the weights are not loaded yet.
    """
    captured = capture_model(model, example_inputs)
    names = resolve_pass_names(pass_names)
    for name in names:
        _apply(name, captured.module, list(captured.graphs))
    return captured.module

