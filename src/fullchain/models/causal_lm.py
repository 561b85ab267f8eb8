"""`CausalLM`: a small GPT-style decoder-only language model.

It is the same `TransformerEncoder` stack as `TransformerClassifier` (same explicit attention, so the
same fusion passes apply), run with a causal mask, followed by a vocabulary head whose weight is tied
to the token embedding by default (fewer parameters, and usually a better small model).

Input ``LongTensor[B, T]`` right-padded with id 0, output logits ``[B, T, vocab_size]`` where position
t predicts token t+1. Padding keys are not masked: with right padding and a causal mask a real token
never sees a pad token, and the loss ignores pad targets (IGNORE_INDEX).
"""

from __future__ import annotations

import torch
from torch import nn

from fullchain.models.encoder import TransformerEncoder


class CausalLM(nn.Module):
    """Token ids ``[B, T]`` -> next-token logits ``[B, T, vocab_size]``."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 256,
        max_length: int = 256,
        dropout: float = 0.1,
        tie_weights: bool = True,
    ):
        super().__init__()
        self.encoder = TransformerEncoder(
            vocab_size, d_model, n_heads, n_layers, d_ff, max_length, dropout, causal=True, mask_padding=False
        )
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        self.tie_weights = bool(tie_weights)
        if self.tie_weights:
            self.lm_head.weight = self.encoder.tok_emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.encoder(ids))
