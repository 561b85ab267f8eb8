"""What every dataset builder returns: three splits, their Task, and everything a model and an artifact need.

Samples are dicts (``{"input_ids": ..., "labels": ...}``, see `fullchain.tasks`); the bundle's `task` turns a
list of them into a batch and knows the loss and metrics. Inputs by kind:
- text: ``input_ids`` ``LongTensor[T]``, unpadded (the task pads per batch and builds ``attention_mask``);
- image: ``pixel_values`` ``FloatTensor[C, H, W]`` normalised with the stored mean/std;
- features: ``features`` ``FloatTensor[D]``;
- lm: ``input_ids`` ``LongTensor[T]`` and next-token ``labels`` ``LongTensor[T]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch.utils.data import Dataset

from fullchain.data.tokenizer import TextEncoder
from fullchain.tasks import IGNORE_INDEX, PAD_ID, Batch, Task

InputKind = Literal["text", "image", "features", "lm"]

__all__ = ["IGNORE_INDEX", "PAD_ID", "DataBundle", "InputKind"]


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset | None
    test: Dataset
    kind: InputKind
    label_names: list[str]
    task: Task
    # Shapes and sizes a model builder needs: vocab_size, max_length (text/lm); channels, height, width (image);
    # num_features (features). Also num_classes for classifiers.
    input_spec: dict[str, Any]
    # Everything needed to preprocess raw input at inference time (normalisation, tokenizer settings).
    preprocessing: dict[str, Any] = field(default_factory=dict)
    encoder: TextEncoder | None = None  # how text became token ids; saved beside the model (tokenizer.json)

    def __post_init__(self) -> None:
        for split in (self.train, self.val, self.test):  # a split knows its task: Trainer(model, opt, bundle.train)
            if split is not None:
                split.task = self.task

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def collate(self, samples: list[dict]) -> Batch:
        return self.task.collate(samples)
