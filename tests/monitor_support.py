"""Shared by the monitor and dashboard tests: a deliberately slow dataset and a training run in a thread
that serves its live metrics (the real TrainingExporter on a free 127.0.0.1 port)."""

from __future__ import annotations

import threading
import time

import torch
from torch.utils.data import Dataset

from fullchain.config import DataConfig
from fullchain.data import build_data
from fullchain.models import build_model, model_args_from_data
from fullchain.monitor.exporter import TrainingExporter
from fullchain.train.trainer import Trainer


class SlowDataset(Dataset):
    """A real dataset whose __getitem__ sleeps: the input pipeline is the bottleneck by construction."""

    def __init__(self, data: Dataset, sleep_s: float):
        self.data, self.sleep_s = data, sleep_s

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        time.sleep(self.sleep_s)
        return self.data[i]


def digits_trainer(sleep_s: float, steps: int, callbacks=(), batch_size: int = 16, **trainer_kwargs) -> Trainer:
    bundle = build_data(DataConfig(name="digits"), seed=0)
    torch.manual_seed(0)
    model = build_model(name="mlp", args=model_args_from_data("mlp", bundle.input_spec, {}))
    data = SlowDataset(bundle.train, sleep_s) if sleep_s else bundle.train
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), data, None,
                   {"max_steps": steps, "batch_size": batch_size, "log_every": 2, "progress": False,
                    "tensorboard": False}, callbacks=list(callbacks), task=bundle.task, **trainer_kwargs)


class TrainingInThread:
    """`with TrainingInThread(sleep_s, steps) as run:` trains in a thread; `run.url` serves its /metrics."""

    def __init__(self, sleep_s: float, steps: int, linger_s: float = 30.0):
        self.exporter = TrainingExporter(port=0, linger_s=linger_s)
        self.trainer = digits_trainer(sleep_s, steps, callbacks=[self.exporter])
        self.thread = threading.Thread(target=self.trainer.fit, daemon=True)
        self.url = self.exporter.url

    def __enter__(self) -> TrainingInThread:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.trainer.total_steps = self.trainer.step  # the loop ends after the step in progress
        self.exporter.close()
        self.thread.join(30)
