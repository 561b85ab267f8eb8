"""Evaluation of a model on a data loader through its Task: loss and the task's metrics.

Used by the Trainer during training and by ``ds evaluate`` on a rebuilt artifact, so both report the same
figures for the same model and data: classifiers report loss, accuracy, macro-F1 and the confusion matrix;
language models loss, perplexity and token accuracy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fullchain.tasks import Batch, Task, to_device


@torch.no_grad()
def evaluate_model(
    model: Callable[..., Any],
    batches: Iterable[Batch],
    task: Task,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Run `model` over `batches` in eval mode; restores the previous train/eval mode of a module afterwards."""
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    metrics = task.metrics()
    try:
        for batch in batches:
            batch = to_device(batch, device)
            with autocast():
                outputs = model(*task.model_inputs(batch))
            metrics.update(outputs, batch)
    finally:
        if module is not None:
            module.train(was_training)
    return metrics.compute()
