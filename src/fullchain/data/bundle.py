"""What every dataset builder returns: three splits plus everything a model and an artifact need.

Batches are always ``(inputs, targets)`` with a single input tensor, so a model's forward takes one
argument and export stays simple:
- text: ``LongTensor[B, T]`` token ids, padded with id 0 (models derive the attention mask from it);
- image: ``FloatTensor[B, C, H, W]`` normalised with the stored mean/std;
- features: ``FloatTensor[B, D]``;
- lm: ``LongTensor[B, T]`` inputs and ``LongTensor[B, T]`` next-token targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

PAD_ID = 0
IGNORE_INDEX = -100

InputKind = Literal["text", "image", "features", "lm"]


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset | None
    test: Dataset
    kind: InputKind
    label_names: list[str]
    # Shapes and sizes a model builder needs: vocab_size, max_length (text/lm); channels, height, width (image);
    # num_features (features). Also num_classes for classifiers.
    input_spec: dict[str, Any]
    # Everything needed to preprocess raw input at inference time (normalisation, tokenizer settings).
    preprocessing: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any | None = None  # a `tokenizers.Tokenizer`, saved beside the model as tokenizer.json

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def collate(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack a list of samples; variable-length token sequences are right-padded with PAD_ID."""
        inputs, targets = zip(*batch, strict=True)
        if self.kind in ("text", "lm"):
            x = torch.nn.utils.rnn.pad_sequence(list(inputs), batch_first=True, padding_value=PAD_ID)
            if self.kind == "lm":
                y = torch.nn.utils.rnn.pad_sequence(list(targets), batch_first=True, padding_value=IGNORE_INDEX)
                return x, y
            return x, torch.stack(list(targets))
        return torch.stack(list(inputs)), torch.stack(list(targets))
