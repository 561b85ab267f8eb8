"""`MLP`: a plain multi-layer perceptron, the baseline for tabular features (and a sanity check on images).

Anything with more than two dimensions is flattened, so ``[B, C, H, W]`` images work with
``num_features = C * H * W``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """``[B, num_features]`` (or ``[B, ...]``, flattened) -> logits ``[B, num_classes]``.

    Each hidden layer is Linear -> ReLU -> Dropout; the last layer is a plain Linear head.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.1,
    ):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if num_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                f"num_features ({num_features}), num_classes ({num_classes}) and hidden {list(hidden)} "
                "must all be at least 1"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.flatten = nn.Flatten(start_dim=1)
        layers: list[nn.Module] = []
        width = num_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.flatten(x)))
