"""Tasks: what depends on the kind of problem (see `fullchain.tasks.base` for the interface).

`task_for(signature, label_names, input_names)` rebuilds the task a model was trained for from what its
model.json records: the input signature (``kind`` and sizes) and the label names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fullchain.errors import UserError
from fullchain.tasks.base import IGNORE_INDEX, LABELS, PAD_ID, Batch, Metrics, Task, batch_size, to_device
from fullchain.tasks.causal_lm import CausalLanguageModelling
from fullchain.tasks.classification import (
    FeatureClassification,
    ImageClassification,
    TextClassification,
    softmax,
)
from fullchain.tasks.tensors import TensorPairs

KINDS = ("text", "image", "features", "lm")


def task_for(signature: Mapping[str, Any], label_names: Sequence[str] = (),
             input_names: Sequence[str] | None = None) -> Task:
    """The task of an input signature (model.json's ``input``): its ``kind`` and the sizes that go with it."""
    kind = signature.get("kind")
    try:
        if kind == "text":
            extra = {"input_names": input_names} if input_names else {}
            return TextClassification(label_names, signature["vocab_size"], signature["max_length"],
                                      signature.get("pad_id", PAD_ID), **extra)
        if kind == "image":
            return ImageClassification(label_names, signature["channels"], signature["height"], signature["width"])
        if kind == "features":
            return FeatureClassification(label_names, signature["num_features"])
        if kind == "lm":
            return CausalLanguageModelling(signature["vocab_size"], signature["max_length"],
                                           signature.get("pad_id", PAD_ID))
    except KeyError as exc:
        raise UserError(f"input signature of kind {kind!r} lacks {exc.args[0]!r}") from None
    raise UserError(f"unknown input kind {kind!r}; expected one of {', '.join(KINDS)}")


__all__ = [
    "IGNORE_INDEX", "KINDS", "LABELS", "PAD_ID", "Batch", "CausalLanguageModelling", "FeatureClassification",
    "ImageClassification", "Metrics", "Task", "TensorPairs", "TextClassification", "batch_size", "softmax",
    "task_for", "to_device",
]
