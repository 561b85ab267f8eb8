"""Evaluation of a model on a data loader: loss, accuracy, macro-F1 and the confusion matrix.

Used by the Trainer during training and by ``ds evaluate`` on a rebuilt artifact, so both report the
same figures for the same model and data. Language models report loss, perplexity and token accuracy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score

from fullchain import metric_names as M
from fullchain.data.bundle import IGNORE_INDEX


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    labels = list(range(num_classes))
    return {
        M.EVAL_ACCURACY: float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        M.EVAL_MACRO_F1: float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    num_classes: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Run `model` over `batches` in eval mode; restores the previous train/eval mode afterwards.

    Token targets ([B, T]) mean a language model; class targets ([B]) a classifier with `num_classes`
    classes (default: the width of the logits).
    """
    was_training = model.training
    model.eval()
    total_loss, total_count = 0.0, 0
    preds, targets = [], []
    is_lm = False
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x)
            loss = loss_fn(logits, y)
        is_lm = y.dim() > 1
        num_classes = num_classes or logits.shape[-1]
        count = int((y != IGNORE_INDEX).sum())
        total_loss += float(loss) * count
        total_count += count
        keep = y != IGNORE_INDEX
        preds.append(logits.argmax(-1)[keep].cpu())
        targets.append(y[keep].cpu())
    model.train(was_training)
    y_pred = torch.cat(preds).numpy() if preds else np.array([], dtype=np.int64)
    y_true = torch.cat(targets).numpy() if targets else np.array([], dtype=np.int64)
    mean_loss = total_loss / max(total_count, 1)
    metrics: dict[str, Any] = {M.EVAL_LOSS: mean_loss, "n": int(total_count)}
    if not is_lm:
        metrics.update(classification_metrics(y_true, y_pred, num_classes or 0))
    else:
        metrics["eval_perplexity"] = math.exp(min(mean_loss, 50.0))
        metrics["eval_token_accuracy"] = float((y_true == y_pred).mean()) if len(y_true) else float("nan")
    return metrics
