"""In-memory samples: the one dataset type every split uses, and the helpers that fill it.

Every set fullchain ships fits in memory (Fashion-MNIST is 60k x 28 x 28), so a split is just
two indexable containers: a stacked tensor (images, features, LM blocks) or a list of
variable-length token tensors (text), plus one target tensor. Keeping them resident makes an
epoch cost only the model's time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fullchain.data.splits import Split
from fullchain.tasks import LABELS

MIN_STD = 1e-6


class Pairs(Dataset):
    """Samples ``{input_name: inputs[i], "labels": targets[i]}`` (a 0-d label or a target sequence).

    Text splits also keep their raw `texts`, so a baseline that reads words (TF-IDF) scores the same samples."""

    def __init__(self, inputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor, input_name: str,
                 texts: Sequence[str] | None = None) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets
        self.input_name = input_name
        self.texts = texts

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {self.input_name: self.inputs[index], LABELS: self.targets[index]}


def encode_labels(values: Sequence[object]) -> tuple[np.ndarray, list[str]]:
    """Map raw labels (strings or ints) to class ids; names are the unique labels as strings.

    Integer-like labels sort numerically ("2" before "10"), others alphabetically, so the
    mapping depends only on the set of labels, never on their order in the file.
    """
    names = [str(v) for v in values]
    unique = sorted(set(names), key=_label_order)
    index = {name: i for i, name in enumerate(unique)}
    return np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names)), unique


def _label_order(name: str) -> tuple[int, int, str]:
    try:
        return (0, int(name), "")
    except ValueError:
        return (1, 0, name)


def normalised_pairs(
    x: np.ndarray, y: np.ndarray, split: Split, input_name: str
) -> tuple[list[Pairs | None], dict[str, list]]:
    """Pairs for train/val/test of ``x`` normalised with the mean/std of the train rows.

    Statistics are per axis-1 entry: the channel of ``[N, C, H, W]`` images, the feature of
    ``[N, D]`` tables. A constant entry keeps std 1 rather than dividing by zero. Returns the
    three splits (val None when unused) and ``{"mean": [...], "std": [...]}`` for preprocessing.
    """
    indices = (split.train, split.val, split.test)
    inputs = [None if idx is None else torch.from_numpy(x[idx]).float() for idx in indices]
    train = inputs[0]
    std, mean = torch.std_mean(train.transpose(0, 1).reshape(train.shape[1], -1), dim=1)
    std = torch.where(std < MIN_STD, torch.ones_like(std), std)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    parts = [
        None
        if data is None
        else Pairs(data.sub_(mean.view(shape)).div_(std.view(shape)), torch.from_numpy(y[idx]), input_name)
        for data, idx in zip(inputs, indices, strict=True)
    ]
    return parts, {"mean": mean.tolist(), "std": std.tolist()}
