"""Causal language modelling: next-token prediction over token blocks, loss per token, perplexity.

Samples hold ``input_ids`` and their next-token ``labels``; padded label positions hold `IGNORE_INDEX` and
carry no loss, so a micro-batch's weight in a step is its number of real target tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fullchain import metric_names as M
from fullchain.tasks.base import IGNORE_INDEX, LABELS, PAD_ID, Batch, Metrics, Task

TOKENS = "input_ids"


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


class TokenMetrics(Metrics):
    """Mean loss per target token, perplexity and next-token accuracy."""

    def __init__(self) -> None:
        self.loss_sum, self.count, self.correct = 0.0, 0, 0

    def update(self, outputs: torch.Tensor, batch: Batch) -> None:
        labels = batch[LABELS]
        keep = labels != IGNORE_INDEX
        self.loss_sum += float(token_loss(outputs.float(), labels))
        self.count += int(keep.sum())
        self.correct += int((outputs.argmax(-1) == labels)[keep].sum())

    def compute(self) -> dict[str, Any]:
        mean = self.loss_sum / max(self.count, 1)
        return {M.EVAL_LOSS: mean, "n": self.count, "eval_perplexity": math.exp(min(mean, 50.0)),
                "eval_token_accuracy": self.correct / self.count if self.count else float("nan")}


class CrossEntropyOverTargets(Task):
    """Cross-entropy summed over every target that is not `IGNORE_INDEX` (class or token targets alike)."""

    def loss(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, int]:
        return token_loss(outputs, batch[LABELS]), self.count_targets(batch)

    def count_targets(self, batch: Batch) -> int:
        return int((batch[LABELS] != IGNORE_INDEX).sum())


class CausalLanguageModelling(CrossEntropyOverTargets):
    name: ClassVar[str] = "causal_lm"

    def __init__(self, vocab_size: int, max_length: int, pad_id: int = PAD_ID,
                 input_names: Sequence[str] = (TOKENS,)):
        self.vocab_size, self.max_length, self.pad_id = vocab_size, max_length, pad_id
        self.input_names = tuple(input_names)

    def collate(self, samples: Sequence[Mapping[str, torch.Tensor]]) -> Batch:
        pad = torch.nn.utils.rnn.pad_sequence
        batch = {TOKENS: pad([s[TOKENS] for s in samples], batch_first=True, padding_value=self.pad_id)}
        if samples and LABELS in samples[0]:
            batch[LABELS] = pad([s[LABELS] for s in samples], batch_first=True, padding_value=IGNORE_INDEX)
        return batch

    def metrics(self) -> TokenMetrics:
        return TokenMetrics()

    def example_batch(self, n: int = 3, length: int | None = None, seed: int = 0) -> Batch:
        g = torch.Generator().manual_seed(seed)
        t = min(length or 24, self.max_length)
        return {TOKENS: torch.randint(1, self.vocab_size, (n, t), generator=g)}

    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        return {TOKENS: {0: "batch", 1: "sequence"}}
