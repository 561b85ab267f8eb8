"""Classification of texts, images and feature rows: one label per sample, cross-entropy, accuracy and macro-F1.

The three tasks differ only in their inputs: token ids (padded per batch; an ``attention_mask`` from the
lengths for models that take one), ``[C, H, W]`` pixels, or ``[D]`` feature rows. Loss, metrics and the
served answer (the most probable label and its softmax probability) are shared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fullchain import metric_names as M
from fullchain.tasks.base import LABELS, PAD_ID, Batch, Metrics, Task

TOKENS, MASK, PIXELS, FEATURES = "input_ids", "attention_mask", "pixel_values", "features"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class ClassificationMetrics(Metrics):
    """Mean loss, accuracy, macro-F1 and the confusion matrix over ``num_classes`` classes."""

    def __init__(self, num_classes: int | None):
        self.num_classes = num_classes
        self.loss_sum, self.count = 0.0, 0
        self.preds: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, outputs: torch.Tensor, batch: Batch) -> None:
        labels = batch[LABELS]
        self.num_classes = self.num_classes or outputs.shape[-1]
        self.loss_sum += float(F.cross_entropy(outputs.float(), labels, reduction="sum"))
        self.count += len(labels)
        self.preds.append(outputs.argmax(-1).cpu())
        self.targets.append(labels.cpu())

    def compute(self) -> dict[str, Any]:
        from sklearn.metrics import confusion_matrix, f1_score  # imported when needed: sklearn takes 0.8 s

        y_pred = torch.cat(self.preds).numpy() if self.preds else np.array([], dtype=np.int64)
        y_true = torch.cat(self.targets).numpy() if self.targets else np.array([], dtype=np.int64)
        labels = list(range(self.num_classes or 0))
        return {
            M.EVAL_LOSS: self.loss_sum / max(self.count, 1),
            "n": self.count,
            M.EVAL_ACCURACY: float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
            M.EVAL_MACRO_F1: float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        }


class Classification(Task):
    """Shared by every classifier: one class index per sample under ``labels``."""

    servable: ClassVar[bool] = True

    def __init__(self, label_names: Sequence[str], input_names: Sequence[str]):
        self.label_names = list(label_names)
        self.input_names = tuple(input_names)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
        labels = batch[LABELS]
        return F.cross_entropy(outputs, labels, reduction="sum"), len(labels)

    def count_targets(self, batch: Batch) -> int:
        return len(batch[LABELS])

    def metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(self.num_classes or None)

    def postprocess(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        probs = softmax(np.asarray(outputs, dtype=np.float64))
        names = self.label_names
        return [{"label": names[i] if i < len(names) else str(i), "score": float(p[i])}
                for i, p in zip(probs.argmax(-1).tolist(), probs, strict=True)]

    def _with_labels(self, batch: Batch, samples: Sequence[Mapping[str, torch.Tensor]]) -> Batch:
        if samples and LABELS in samples[0]:
            batch[LABELS] = torch.stack([torch.as_tensor(s[LABELS]) for s in samples])
        return batch


class TextClassification(Classification):
    """Token ids in (``input_ids``, plus ``attention_mask`` for models that take it), one label out.

    `collate` right-pads with `pad_id` and builds the attention mask from each sequence's length, never from
    the ids (a model's pad id can be a real token, e.g. GPT-2's end-of-text).
    """

    name: ClassVar[str] = "text_classification"

    def __init__(self, label_names: Sequence[str], vocab_size: int, max_length: int, pad_id: int = PAD_ID,
                 input_names: Sequence[str] = (TOKENS,)):
        super().__init__(label_names, input_names)
        self.vocab_size, self.max_length, self.pad_id = vocab_size, max_length, pad_id

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> Batch:
        ids = [s[TOKENS] for s in samples]
        lengths = torch.tensor([len(t) for t in ids])
        padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=self.pad_id)
        mask = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).long()
        return self._with_labels({TOKENS: padded, MASK: mask}, samples)

    def example_batch(self, n: int = 3, length: int | None = None, seed: int = 0) -> Batch:
        """Random ids with trailing padding of different lengths per row, as a server's padded batches have."""
        g = torch.Generator().manual_seed(seed)
        t = min(length or 24, self.max_length)
        low = 1 if self.pad_id == 0 else 0
        rows = []
        for row in range(n):
            keep = t - row * max(1, t // (2 * n)) if row else t
            rows.append({TOKENS: torch.randint(low, self.vocab_size, (max(1, keep),), generator=g)})
        return self.collate(rows)

    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch", 1: "sequence"} for name in self.input_names}


class ImageClassification(Classification):
    """``pixel_values`` ``[B, C, H, W]`` (normalised) in, one label out."""

    name: ClassVar[str] = "image_classification"

    def __init__(self, label_names: Sequence[str], channels: int, height: int, width: int):
        super().__init__(label_names, (PIXELS,))
        self.channels, self.height, self.width = channels, height, width

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> Batch:
        return self._with_labels({PIXELS: torch.stack([s[PIXELS] for s in samples])}, samples)

    def example_batch(self, n: int = 3, length: int | None = None, seed: int = 0) -> Batch:
        g = torch.Generator().manual_seed(seed)
        return {PIXELS: torch.randn(n, self.channels, self.height, self.width, generator=g)}


class FeatureClassification(Classification):
    """``features`` ``[B, D]`` (normalised) in, one label out."""

    name: ClassVar[str] = "feature_classification"

    def __init__(self, label_names: Sequence[str], num_features: int):
        super().__init__(label_names, (FEATURES,))
        self.num_features = num_features

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> Batch:
        return self._with_labels({FEATURES: torch.stack([s[FEATURES] for s in samples])}, samples)

    def example_batch(self, n: int = 3, length: int | None = None, seed: int = 0) -> Batch:
        g = torch.Generator().manual_seed(seed)
        return {FEATURES: torch.randn(n, self.num_features, generator=g)}
