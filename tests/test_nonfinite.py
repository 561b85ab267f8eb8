"""A diverging run (NaN/inf loss or gradients, fp32 and bf16) stops, keeps its last good checkpoint, writes no model.

SGD with a learning rate of 1e8 on the digits MLP overflows within a few steps: a real divergence, not a mock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fullchain.config import validate_config
from fullchain.stages.train import train_stage
from fullchain.train.nonfinite import NonFiniteTraining


def run_config(tmp_path, precision="fp32", policy="stop"):
    return {
        "name": "diverge", "runs_dir": str(tmp_path / "runs"),
        "model": {"name": "mlp", "args": {"hidden": [32]}}, "data": {"name": "digits"},
        "train": {"max_steps": 40, "batch_size": 32, "progress": False, "tensorboard": False, "log_every": 1,
                  "precision": precision, "on_nonfinite": policy,
                  "optimizer": {"name": "sgd", "lr": 1.0e8}, "schedule": {"kind": "constant"}},
        "checkpoint": {"every_steps": 2, "async": False, "keep_last": 50},
    }


def finite_checkpoints(run_dir):
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    assert steps, "no checkpoint was kept"
    return all(torch.isfinite(t).all() for s in steps for t in load_file(s / "model.safetensors").values()), steps


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, precision):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(run_config(tmp_path, precision)))
    result = subprocess.run([sys.executable, "-m", "fullchain.cli", "train", str(run)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and last.startswith("error: step ") and "no model was written" in last
    stopped_at = int(last.split("step ")[1].split(":")[0])
    run_dir = tmp_path / "runs" / "diverge"
    assert not (run_dir / "model").exists()
    all_finite, steps = finite_checkpoints(run_dir)
    assert all_finite
    assert int(steps[-1].name.split("-")[1]) < stopped_at  # nothing was saved from the step that diverged
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["event"] == "nonfinite" and rows[-1]["step"] == stopped_at


def test_skip_drops_the_bad_updates_counts_them_and_writes_finite_weights(tmp_path):
    outcome = train_stage(validate_config(run_config(tmp_path, policy="skip")))
    assert outcome.result.nonfinite_skipped_steps > 0 and outcome.result.steps == 40
    weights = load_file(outcome.model_dir / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    rows = [json.loads(line) for line in (tmp_path / "runs/diverge/metrics.jsonl").read_text().splitlines()]
    last_train_row = [r for r in rows if "nonfinite_skipped_steps_total" in r][-1]  # the epoch's evaluation follows it
    assert last_train_row["nonfinite_skipped_steps_total"] == outcome.result.nonfinite_skipped_steps


def test_the_python_api_raises_and_leaves_the_weights_of_the_last_applied_step(tmp_path):
    from fullchain.models import build_model
    from fullchain.train import Trainer

    torch.manual_seed(0)
    model = build_model(name="mlp", args={"num_features": 8, "num_classes": 2, "hidden": [8]})
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    x[40] = float("inf")  # one poisoned sample
    data = torch.utils.data.TensorDataset(x, y)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
                      config={"max_steps": 8, "batch_size": 8, "progress": False, "tensorboard": False})
    with pytest.raises(NonFiniteTraining, match=r"^step \d+: the loss is nan"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in model.parameters())
