"""Shared by the release tests (gates, A/B, live A/B, the scaffolded pipeline): two small digits classifiers,
trained in-process once per test session, and the `ds` command run in this process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fullchain.config import validate_config

# name -> (training steps, hidden units, seed): a fair model and a poor one that disagree on many examples; one
# seed, so both split the data alike (`ds ab` compares models on the same examples)
MODELS = {"good": (60, 32, 0), "poor": (6, 8, 0)}
_trained: dict[str, Path] = {}


def train_digits(root: Path, name: str, steps: int, hidden: int = 32, seed: int = 0) -> Path:
    """An MLP on the built-in digits data; more steps make a better model. Returns its artifact directory."""
    from fullchain.stages.train import train_stage

    cfg = validate_config({
        "name": name, "runs_dir": str(root), "seed": seed,
        "model": {"name": "mlp", "args": {"hidden": [hidden]}}, "data": {"name": "digits"},
        "train": {"max_steps": steps, "batch_size": 32, "progress": False, "tensorboard": False},
        "checkpoint": {"enabled": False},
    })
    return train_stage(cfg).model_dir


def trained(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """The model `name` of `MODELS`, trained on first use and shared by every test module after that."""
    if name not in _trained:
        _trained[name] = train_digits(tmp_path_factory.mktemp("release-models"), name, *MODELS[name])
    return _trained[name]


def ds_in_process(monkeypatch: pytest.MonkeyPatch, *args) -> int:
    """`ds ARGS` through the real entry point (error mapping included) without a new interpreter; the exit code."""
    from fullchain.cli import main

    monkeypatch.setattr(sys, "argv", ["ds", *map(str, args)])
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0
