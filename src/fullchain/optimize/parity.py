"""Parity of a rewritten model against the original: max absolute and relative error, per dtype tolerance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves

# (atol, rtol) for `torch.allclose`-style checks of a model's outputs in each inference dtype. fp32
# rewrites must be exact up to reassociation; bf16/fp16 conversions are judged against fp32 outputs.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


@dataclass(frozen=True)
class Parity:
    """How far ``outputs`` are from ``reference``; ``max_rel`` is relative to the reference's largest value."""

    max_abs: float
    max_rel: float
    ok: bool
    atol: float
    rtol: float

    def to_json(self) -> dict[str, float | bool]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "ok": self.ok, "atol": self.atol, "rtol": self.rtol}


def compare(
    outputs, reference, dtype: torch.dtype = torch.float32, tolerance: tuple[float, float] | None = None
) -> Parity:
    """Compare two (nested) model outputs leaf by leaf in float64."""
    atol, rtol = tolerance or TOLERANCES[dtype]
    got, want = tree_leaves(outputs), tree_leaves(reference)
    if len(got) != len(want):
        return Parity(float("inf"), float("inf"), False, atol, rtol)
    max_abs = max_rel = 0.0
    ok = True
    for a, b in zip(got, want, strict=True):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            return Parity(float("inf"), float("inf"), False, atol, rtol)
        diff = (a - b).abs()
        if diff.numel():
            finite = torch.isfinite(a) & torch.isfinite(b)
            same_nonfinite = bool(((a == b) | finite).all())
            err = float(diff[finite].max()) if finite.any() else 0.0
            scale = float(b[finite].abs().max()) if finite.any() else 0.0
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / scale if scale > 0 else err)
            ok = ok and same_nonfinite and bool((diff[finite] <= atol + rtol * b[finite].abs()).all())
    return Parity(max_abs, max_rel, ok, atol, rtol)
