"""What a quantisation report measures: held-out accuracy, batch-1 latency and size, for any callable model.

The contenders (eager module, compiled program, ONNX Runtime session) only share "model inputs in, logits
out", so everything here takes a `predict` function and fixed batches, which keeps the figures comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from fullchain.optimize.measure import latency_samples, median_p99_ms
from fullchain.tasks import LABELS, Batch, Task

Predict = Callable[..., torch.Tensor]


def batches(dataset: Dataset, collate: Callable, batch_size: int, limit: int | None = None) -> list[Batch]:
    """The first `limit` samples (all by default) of `dataset` as collated batches, in order."""
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    return list(DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate))


@torch.no_grad()
def accuracy(predict: Predict, data: Iterable[Batch], task: Task) -> float:
    correct = total = 0
    for batch in data:
        labels = batch[LABELS]
        correct += int((predict(*task.model_inputs(batch)).argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


@torch.no_grad()
def latency_ms(predict: Predict, example: tuple[torch.Tensor, ...], repeats: int = 200,
               warmup: int = 20) -> dict[str, float]:
    """Median and p99 of single calls on `example` (batch 1 for the real-time figure), in milliseconds."""
    median, p99 = median_p99_ms(latency_samples(lambda: predict(*example), repeats, warmup))
    return {"median": median, "p99": p99}


def size_bytes(*paths: Path) -> int:
    return sum(Path(p).stat().st_size for p in paths)
