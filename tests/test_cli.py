"""The `ds` command as a user runs it: real processes, real files, exit codes and messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DS = [sys.executable, "-m", "fullchain.cli"]


def ds(*args, cwd=None, env=None, timeout=600):
    return subprocess.run([*DS, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def write_run(tmp_path: Path, **sections) -> Path:
    raw = {"name": "t", "runs_dir": str(tmp_path / "runs"), "model": {"name": "mlp"}, "data": {"name": "digits"},
           "train": {"max_steps": 5, "progress": False}}
    raw.update(sections)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_help_lists_the_stage_commands():
    result = ds("--help")
    assert result.returncode == 0
    for command in ("train", "evaluate", "run", "bench", "config", "models"):
        assert command in result.stdout


def test_ds_models_lists_the_registry_the_config_accepts():
    from fullchain.models.registry import MODELS

    listed = ds("models")
    assert listed.returncode == 0 and all(name in listed.stdout for name in MODELS)
    assert "model.hf" in listed.stdout and "model.target" in listed.stdout


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ({"max_steps": 5, "learning_rate": 0.1}, "run.yaml: train: unknown key 'learning_rate'"),
        ({"max_steps": "five"}, "run.yaml: train.max_steps: expected an integer, got the string 'five'"),
        ({"precision": "fp8"}, "run.yaml: train.precision: 'fp8' is not one of fp32, bf16, fp16"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_the_field(tmp_path, train, expected):
    result = ds("train", write_run(tmp_path, train=train))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0]


def test_missing_dataset_exits_2_naming_the_install_command(tmp_path):
    empty = tmp_path / "no-fashion"
    empty.mkdir()
    path = write_run(tmp_path, data={"name": "fashion_mnist"})
    result = ds("train", path, env={"FULLCHAIN_FASHION_MNIST_DIR": str(empty)})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_config_show_prints_the_resolved_file(tmp_path):
    result = ds("config", "show", write_run(tmp_path), "--set", "train.precision=bf16")
    assert result.returncode == 0
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["precision"] == "bf16" and shown["train"]["grad_accum"] == 1


def test_run_then_evaluate_reproduces_the_recorded_accuracy(tmp_path):
    """Text path end to end: tokenizer trained, artifact written, rebuilt in a new process, same figures."""
    path = write_run(
        tmp_path,
        model={"name": "transformer", "args": {"d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64}},
        data={"name": "bbc_news", "max_samples": 300, "tokenizer": {"vocab_size": 1000, "max_length": 64}},
        train={"max_steps": 6, "batch_size": 16, "progress": True},  # a model, not a good one: the figures match
    )
    result = ds("run", path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "t"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"steps", "samples_per_s", "wall_s"} <= summary["train"].keys()
    assert {"accuracy", "macro_f1", "n"} <= summary["eval"].keys()
    model_dir = run_dir / "model"
    assert {"model.safetensors", "model.json", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    assert (run_dir / "metrics.jsonl").stat().st_size > 0 and (run_dir / "config.yaml").exists()

    result = ds("evaluate", model_dir, "--json", tmp_path / "eval.json")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["n"] == summary["eval"]["n"]
    assert evaluated["accuracy"] == summary["eval"]["accuracy"]
    assert evaluated["macro_f1"] == summary["eval"]["macro_f1"]
    assert sum(map(sum, evaluated["confusion_matrix"])) == evaluated["n"]


def test_evaluate_on_a_user_csv_and_bad_model_dir(bbc_transformer, tmp_path):
    csv = tmp_path / "few.csv"
    csv.write_text('text,label\n"Shares in the bank rose after profits beat forecasts",business\n'
                   '"The striker scored twice in the cup final",sports\n')
    result = ds("evaluate", bbc_transformer, "--data", csv, "--json", tmp_path / "e.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 2

    result = ds("evaluate", tmp_path)
    assert result.returncode == 2 and "not a model artifact" in result.stderr and "Traceback" not in result.stderr
