"""Shared by the quantisation and artifact-variant tests: a small CNN trained on a data slice, saved with its
data recipe so that `ds evaluate`, `ds optimize` and the quantisers rebuild its splits."""

from __future__ import annotations

from pathlib import Path

import torch

from fullchain.artifact import ArtifactMeta, save_artifact
from fullchain.config import DataConfig
from fullchain.data import build_data
from fullchain.models import build_model, model_args_from_data
from fullchain.train.trainer import Trainer

TRAIN_THREADS = 2  # float reductions depend on the thread count; in-process servers set it to 1 for the process


def trained_cnn_artifact(directory: Path, data: DataConfig, model_args: dict, steps: int) -> Path:
    """The same weights whatever ran before in this process (tests that quantise them depend on exact values)."""
    bundle = build_data(data, seed=0)
    args = model_args_from_data("cnn", bundle.input_spec, model_args)
    torch.manual_seed(0)
    model = build_model(name="cnn", args=args)
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        Trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), bundle.train,
                config={"max_steps": steps, "batch_size": 64, "progress": False, "tensorboard": False,
                        "device": "cpu"}).fit()
    finally:
        torch.set_num_threads(threads)
    meta = ArtifactMeta(builder={"name": "cnn"}, args=args, input={"kind": bundle.kind, **bundle.input_spec},
                        label_names=bundle.label_names, data={"config": data.model_dump(mode="json"), "seed": 0},
                        task=bundle.task.describe())
    return save_artifact(directory, model.eval(), meta)


def train(root: Path, name: str, model: dict, data: dict, steps: int) -> Path:
    """`ds train`'s stage in this process, without checkpoints; returns the model artifact's directory."""
    from fullchain.config import validate_config
    from fullchain.stages.train import train_stage

    cfg = validate_config({
        "name": name, "runs_dir": str(root), "model": model, "data": data,
        "train": {"max_steps": steps, "batch_size": 32, "progress": False, "tensorboard": False},
        "checkpoint": {"enabled": False},
    })
    return train_stage(cfg).model_dir
