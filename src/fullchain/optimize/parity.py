"""Parity of a rewritten model against the original: max absolute and relative error, per dtype tolerance,
and the edge-case inputs every rewrite is checked on.

Sample inputs rarely contain the rows where rewrites go wrong: a sequence that is all padding (every key
masked), a single token, the longest length the model takes. `edge_inputs` builds them from the task, the
one source of model inputs; `compare` counts NaN and infinities as equal only where both sides have the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

TOKENS = "input_ids"  # the token-id input of text tasks (`fullchain.tasks`)

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
            same_nonfinite = bool(((a == b) | finite | (a.isnan() & b.isnan())).all())
            err = float(diff[finite].max()) if finite.any() else 0.0
            scale = float(b[finite].abs().max()) if finite.any() else 0.0
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / scale if scale > 0 else err)
            ok = ok and same_nonfinite and bool((diff[finite] <= atol + rtol * b[finite].abs()).all())
    return Parity(max_abs, max_rel, ok, atol, rtol)


def edge_inputs(task: Any, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Batches that probe the edges, through the task's own collate so masks and padding are built as in serving.

    Token tasks: a full row beside a padding-only row (every key masked), a batch of single tokens, and the
    longest length beside a one-token row. Other tasks: a batch of one.
    """
    length = getattr(task, "max_length", None)
    if TOKENS not in getattr(task, "input_names", ()) or not length:
        return [task.example_inputs(1, seed=seed)]
    g = torch.Generator().manual_seed(seed)
    low = 1 if getattr(task, "pad_id", 0) == 0 else 0
    vocab = int(getattr(task, "vocab_size", 2))

    def batch(*lengths: int) -> tuple[torch.Tensor, ...]:
        rows = [{TOKENS: torch.randint(low, vocab, (n,), generator=g)} for n in lengths]
        return task.model_inputs(task.collate(rows))

    return [batch(min(length, 16), 0), batch(1, 1), batch(length, 1)]
