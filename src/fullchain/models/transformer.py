"""`TransformerClassifier`: a small pre-LN Transformer encoder that classifies token sequences.

Input is ``LongTensor[B, T]`` of token ids right-padded with id 0; the padding mask is derived from
the ids, so the model's forward takes one tensor (which keeps export and serving simple). The
attention is the explicit one from `fullchain.models.encoder`, which the optimisation passes fuse.
"""

from __future__ import annotations

import torch
from torch import nn

from fullchain.models.encoder import PAD_ID, TransformerEncoder

POOLINGS = ("mean", "cls")


class TransformerClassifier(nn.Module):
    """Token ids ``[B, T]`` -> class logits ``[B, num_classes]``.

    ``pooling="mean"`` averages the final hidden states over non-pad tokens (an all-padding row pools
    to zeros, so its logits are just the head's bias); ``pooling="cls"`` takes the first token's
    state, for tokenisers that put a [CLS] token first. Appending padding never changes the logits.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 256,
        max_length: int = 512,
        dropout: float = 0.1,
        pooling: str = "mean",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.pooling = pooling
        self.encoder = TransformerEncoder(
            vocab_size, d_model, n_heads, n_layers, d_ff, max_length, dropout, causal=False, mask_padding=True
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.encoder(ids)  # [B, T, d_model]
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            keep = (ids != PAD_ID).unsqueeze(-1).to(h.dtype)  # [B, T, 1]
            pooled = (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))
