"""Quantisation-aware training: fake-quantised fine-tuning through the ordinary Trainer.

`prepare_qat` (PT2E) turns the model into a training graph in which every weight and activation the
X86 quantizer will quantise passes through a fake-quantize module (observer + round-to-int8 with a
straight-through gradient), and Conv-BN pairs are simulated folded. That graph is an `nn.Module` with
`.train()` / `.eval()`, so the Trainer drives it like any model: precision, callbacks, metric logging and
checkpoints all apply. `finetune` returns the trained fake-quantised graph, ready for conversion.

The ONNX Runtime backend has no QAT of its own: `float_weights` copies the QAT-trained weights (and
BatchNorm statistics) back into the eager model, which ORT then quantises with the same int8 scheme
(per-channel symmetric int8 weights, uint8 activations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fullchain.config import ScheduleConfig, TrainConfig
from fullchain.optimize.quantize.pt2e import prepare_qat
from fullchain.train.trainer import Trainer


def finetune(
    model: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    train_data: Dataset,
    collate: Any,
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    callbacks: list[Any] = (),
    run_dir: str | Path | None = None,
) -> tuple[torch.fx.GraphModule, Trainer]:
    """Fine-tune `model` with fake quantisation for `steps` steps; returns the prepared graph and its Trainer."""
    prepared = prepare_qat(model, example)
    config = TrainConfig(max_steps=steps, batch_size=batch_size, device="cpu", progress=False, tensorboard=False,
                         schedule=ScheduleConfig(warmup_steps=min(20, steps // 10)))
    optimizer = torch.optim.AdamW(prepared.parameters(), lr=lr)
    trainer = Trainer(prepared, optimizer, train_data, config=config, collate_fn=collate, seed=seed,
                      callbacks=list(callbacks), run_dir=run_dir)
    trainer.fit()
    prepared.eval()
    return prepared, trainer


def float_weights(prepared: torch.fx.GraphModule, model: torch.nn.Module) -> torch.nn.Module:
    """Load the QAT-trained parameters and buffers of `prepared` into `model` (same names; fake-quant state dropped)."""
    trained = prepared.state_dict()
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in trained]
    if missing:
        raise RuntimeError(f"QAT graph lacks the model's tensors {missing[:4]}")
    model.load_state_dict({k: trained[k] for k in wanted})
    return model.eval()
