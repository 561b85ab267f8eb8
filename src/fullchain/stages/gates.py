"""Quality gates of `ds evaluate --gate`: ``"accuracy>=0.95,macro_f1>=0.9,latency_p99_ms<=20"``.

A gate is ``METRIC>=LIMIT`` or ``METRIC<=LIMIT``; the limit is a number, or ``baseline`` with an optional margin
(``accuracy>=baseline-0.01``: no more than one point below the model named by ``--baseline``). A release
pipeline runs the gates on the new model and stops before deploying it when one fails (exit code 1).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fullchain.errors import UserError
from fullchain.stages.evaluate import evaluate_artifact

LATENCY_METRICS = ("latency_p50_ms", "latency_p99_ms")
LATENCY_CALLS = 300  # batch-1 calls timed per model: enough for a stable p99 (the 3rd slowest call)
METRICS = ("accuracy", "macro_f1", "loss", "perplexity", "token_accuracy", *LATENCY_METRICS)
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TERM = re.compile(rf"^(?P<metric>[A-Za-z_][A-Za-z0-9_]*)(?P<op>>=|<=)"
                   rf"(?:(?P<number>{_NUMBER})|baseline(?P<margin>[-+](?:\d+(?:\.\d*)?|\.\d+))?)$")


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str  # ">=" or "<="
    limit: float | None  # None: the baseline's value (plus `margin`)
    margin: float = 0.0

    def describe(self) -> str:
        if self.limit is not None:
            return f"{self.op} {self.limit:g}"
        return f"{self.op} baseline" + (f"{self.margin:+g}" if self.margin else "")

    def bound(self, baseline: dict[str, Any] | None) -> float:
        if self.limit is not None:
            return self.limit
        if baseline is None:
            raise UserError(f"--gate {self.metric}{self.describe().replace(' ', '')}: needs --baseline MODEL")
        return float(baseline[self.metric]) + self.margin

    def passes(self, value: float, bound: float) -> bool:
        if math.isnan(value):
            return False
        return value >= bound if self.op == ">=" else value <= bound


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    new: float
    baseline: float | None
    bound: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.gate.metric, "new": self.new, "baseline": self.baseline,
                "limit": self.gate.describe(), "bound": self.bound, "passed": self.passed}


def parse_gates(text: str) -> list[Gate]:
    """``"a>=0.9,b<=20"`` -> gates; a malformed term or an unknown metric is a UserError naming that term."""
    gates = []
    for term in (t.strip() for t in text.split(",")):
        match = _TERM.match(term.replace(" ", ""))
        if match is None:
            raise UserError(f"--gate: {term!r} is not METRIC>=LIMIT or METRIC<=LIMIT "
                            "(LIMIT: a number, or baseline with an optional +/- margin)")
        metric = match["metric"]
        if metric not in METRICS:
            raise UserError(f"--gate: {term!r}: unknown metric {metric!r} (one of {', '.join(METRICS)})")
        number = match["number"]
        gates.append(Gate(metric, match["op"], float(number) if number is not None else None,
                          float(match["margin"] or 0.0)))
    return gates


def needs_latency(gates: list[Gate]) -> bool:
    return any(g.metric in LATENCY_METRICS for g in gates)


def check_gates(gates: list[Gate], new: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[GateResult]:
    """Each gate against the new model's figures (the baseline's shown beside them)."""
    results = []
    for gate in gates:
        if gate.metric not in new:
            reported = ", ".join(k for k in METRICS if k in new)
            raise UserError(f"--gate {gate.metric}: this model reports no {gate.metric} (it reports {reported})")
        bound = gate.bound(baseline)
        value = float(new[gate.metric])
        results.append(GateResult(gate, value, None if baseline is None else float(baseline[gate.metric]), bound,
                                  gate.passes(value, bound)))
    return results


def gated_evaluation(model: str | Path, gate_text: str | None, baseline: str | Path | None = None,
                     latency_calls: int = LATENCY_CALLS, **evaluate_args: Any) -> dict[str, Any]:
    """`ds evaluate MODEL [--baseline OLD] [--gate ...]`: the gates are parsed before any model is loaded, the
    latency timed only when a gate reads it; returns the new model's figures with ``baseline`` and ``gates``."""
    gates = parse_gates(gate_text) if gate_text is not None else []
    calls = latency_calls if needs_latency(gates) else 0
    new = evaluate_artifact(model, latency_calls=calls, **evaluate_args)
    old = evaluate_artifact(baseline, latency_calls=calls, **evaluate_args) if baseline is not None else None
    results = check_gates(gates, new, old)
    return {**new, "baseline": old, "gates": [r.as_dict() for r in results],
            "gates_passed": all(r.passed for r in results)}
