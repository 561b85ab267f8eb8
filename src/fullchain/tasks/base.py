"""The Task interface: everything that depends on the kind of problem, in one object.

A batch is a ``dict[str, Tensor]``: the model inputs under the names in `Task.input_names` and the
targets under ``"labels"``. The Trainer's step is, whatever the problem::

    outputs = model(*task.model_inputs(batch))
    loss_sum, n_targets = task.loss(outputs, batch)

Models are called with the task's inputs *positionally*, in `input_names` order, rather than by keyword as
in a Hugging Face ``model(**batch)``: a user's model written as ``forward(self, x)`` then works unchanged, and
every exported program (ONNX, ``torch.export``) takes the same inputs in the same order. A model that needs
more than its primary input (a Hugging Face encoder also takes ``attention_mask``) gets a task whose
`input_names` list them.

A Task owns: how samples become a batch (`collate`), the loss as a sum with the number of targets it covers
(so micro-batches of any size weigh right), the evaluation metrics, example inputs (the one source of sample
inputs for export, optimisation, quantisation and serving), the request schema of ``ds serve`` and the
response (`postprocess`). Nothing downstream guesses the problem from a tensor's rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

Batch = dict[str, torch.Tensor]
LABELS = "labels"
PAD_ID = 0  # token id 0 pads sequences of our own tokenizers
IGNORE_INDEX = -100  # a token target that carries no loss


class Metrics:
    """Accumulates one evaluation pass: `update` per batch, `compute` at the end."""

    def update(self, outputs: Any, batch: Batch) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        raise NotImplementedError


class Task:
    """Base class; see the module docstring. Subclasses set `name` and implement the hooks."""

    name: ClassVar[str]
    servable: ClassVar[bool] = False
    input_names: tuple[str, ...]

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The model's positional arguments, taken from the batch."""
        return tuple(batch[name] for name in self.input_names)

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> Batch:
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, int]:
        """The loss summed over the batch's targets, and how many targets that is."""
        raise NotImplementedError

    def count_targets(self, batch: Batch) -> int:
        """Targets that carry loss, known before the forward pass (weights micro-batches within a step)."""
        raise NotImplementedError

    def metrics(self) -> Metrics:
        raise NotImplementedError

    def example_batch(self, n: int = 3, length: int | None = None, seed: int = 0) -> Batch:
        """Model inputs of the right signature (no labels), deterministic for a seed."""
        raise NotImplementedError

    def example_inputs(self, n: int = 3, length: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
        return self.model_inputs(self.example_batch(n, length, seed))

    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        """Per input, the dimensions whose size varies between calls (batch, sequence)."""
        return {name: {0: "batch"} for name in self.input_names}

    def postprocess(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        """A served batch's outputs as one JSON-able answer per row."""
        raise NotImplementedError(f"a {self.name} model cannot be served")

    def describe(self) -> dict[str, Any]:
        """What model.json records to rebuild this task (with the input signature and label names)."""
        return {"name": self.name, "input_names": list(self.input_names)}


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))
