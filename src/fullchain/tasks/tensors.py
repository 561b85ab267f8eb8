"""The task of plain ``(inputs, targets)`` datasets, so the Trainer also runs on a ``TensorDataset``.

Python users hand the Trainer their own datasets of tuples; this task calls the model with the first element
and scores it with cross-entropy against the second: class targets ``[B]`` for a classifier, token targets
``[B, T]`` (`IGNORE_INDEX` for no loss) for a sequence model. The datasets fullchain builds carry their own
task instead (see `fullchain.data`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch.utils.data import default_collate

from fullchain.errors import UserError
from fullchain.tasks.base import LABELS, Batch, Metrics
from fullchain.tasks.causal_lm import CrossEntropyOverTargets, TokenMetrics
from fullchain.tasks.classification import ClassificationMetrics

INPUTS = "inputs"


class _ByTargetShape(Metrics):
    """Classification metrics for class targets, token metrics for sequence targets (decided on the first batch)."""

    def __init__(self) -> None:
        self.inner: Metrics | None = None

    def update(self, outputs: torch.Tensor, batch: Batch) -> None:
        if self.inner is None:
            self.inner = TokenMetrics() if batch[LABELS].dim() > 1 else ClassificationMetrics(None)
        self.inner.update(outputs, batch)

    def compute(self) -> dict[str, Any]:
        return self.inner.compute() if self.inner is not None else {"n": 0}


class TensorPairs(CrossEntropyOverTargets):
    name: ClassVar[str] = "tensor_pairs"
    input_names = (INPUTS,)

    def collate(self, samples: Sequence[Any]) -> Batch:
        if samples and isinstance(samples[0], dict):
            raise UserError(f"samples are dicts (keys {sorted(samples[0])}): tell the Trainer their task, "
                            "Trainer(..., task=bundle.task), or give it a dataset of (inputs, targets) tuples")
        inputs, targets = default_collate(list(samples))
        return {INPUTS: inputs, LABELS: targets}

    def metrics(self) -> Metrics:
        return _ByTargetShape()
