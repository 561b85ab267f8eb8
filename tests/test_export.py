"""`ds export`: every reference model exports to ONNX and matches torch in ONNX Runtime; TensorRT's absence and
its version-dependent flags are handled."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fullchain.deploy import tensorrt
from fullchain.models import build_model
from fullchain.runtime import OnnxRuntime
from fullchain.runtime.onnx import ExportReport, check_parity, export_onnx
from fullchain.tasks import Task, task_for

TEXT_INPUT = {"kind": "text", "vocab_size": 300, "max_length": 64, "num_classes": 4, "pad_id": 0}
REFERENCE_MODELS = {
    "mlp": ({"num_features": 64, "num_classes": 10, "hidden": [32]},
            {"kind": "image", "channels": 1, "height": 8, "width": 8}),
    "cnn": ({"num_classes": 10, "channels": 1, "widths": [8, 16], "blocks_per_stage": [1, 1]},
            {"kind": "image", "channels": 1, "height": 8, "width": 8}),
    "transformer": ({"vocab_size": 300, "num_classes": 4, "d_model": 32, "n_heads": 2, "n_layers": 2, "d_ff": 64,
                     "max_length": 64}, TEXT_INPUT),
    "causal_lm": ({"vocab_size": 300, "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64, "max_length": 64},
                  {**TEXT_INPUT, "kind": "lm"}),
}


def model_and_task(name: str) -> tuple[torch.nn.Module, Task]:
    args, inp = REFERENCE_MODELS[name]
    torch.manual_seed(0)
    return build_model(name=name, args=args).eval(), task_for(inp, ["a", "b", "c", "d"])


def export(model: torch.nn.Module, task: Task, path: Path, inputs, **kwargs):
    return export_onnx(model, inputs, path, task.input_names, task.dynamic_dims(), **kwargs)


@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_reference_model_exports_with_dynamo_and_matches_torch_at_other_shapes(name, tmp_path):
    model, task = model_and_task(name)
    other = task.example_inputs(7, length=50, seed=3)
    report = export(model, task, tmp_path / "model.onnx", task.example_inputs(3), check_with=[other])
    assert report.exporter == "dynamo", report.notes
    assert report.parity_ok, report.max_abs_error
    assert report.checked_shapes[1] == [list(x.shape) for x in other]
    got = OnnxRuntime(tmp_path / "model.onnx")(*other)
    with torch.inference_mode():
        expected = model(*other).numpy()
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))


def test_parity_check_catches_a_model_that_differs(tmp_path):
    model, task = model_and_task("mlp")
    x = task.example_inputs(4)
    assert export(model, task, tmp_path / "model.onnx", x).parity_ok
    with torch.no_grad():
        model.head.bias.add_(0.01)  # the ONNX file no longer matches these weights
    report = ExportReport(str(tmp_path / "model.onnx"), "dynamo", True, None)
    check_parity(model, tmp_path / "model.onnx", [x], report)
    assert not report.parity_ok and report.max_abs_error == pytest.approx(0.01, rel=1e-3)


def ds(*args):
    return subprocess.run([sys.executable, "-m", "fullchain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_ds_export_writes_onnx_with_its_preprocessing_beside(bbc_transformer, tmp_path):
    out = tmp_path / "deploy" / "model.onnx"
    result = ds("export", bbc_transformer, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "dynamo exporter, parity max |error|" in " ".join(result.stdout.split())
    assert {p.name for p in out.parent.iterdir()} >= {"model.onnx", "model.json", "tokenizer.json"}
    assert json.loads((out.parent / "model.json").read_text())["label_names"]


@pytest.mark.skipif(shutil.which("trtexec") is not None, reason="trtexec is installed here")
def test_tensorrt_export_without_tensorrt_exits_2_naming_the_install(bbc_transformer):
    if _has_tensorrt_module():
        pytest.skip("the tensorrt Python package is installed here")
    result = ds("export", bbc_transformer, "--format", "tensorrt")
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "pip install tensorrt" in message and "trtexec" in message and "Traceback" not in result.stderr


def _has_tensorrt_module() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def test_trtexec_flags_follow_the_tensorrt_major_version():
    shapes = tensorrt.shape_ranges(task_for(TEXT_INPUT, ["a"], ["input_ids", "attention_mask"]))
    assert shapes["input_ids"] == shapes["attention_mask"] == {"min": [1, 1], "opt": [8, 64], "max": [64, 64]}
    v10, notes10 = tensorrt.trtexec_command("trtexec", 10, Path("m.onnx"), Path("m.engine"), shapes, fp16=True)
    assert "--fp16" in v10 and "--memPoolSize=workspace:1024M" in v10 and not notes10
    assert "--minShapes=input_ids:1x1,attention_mask:1x1" in v10 and "--maxShapes=input_ids:64x64" in " ".join(v10)
    assert not any(flag.startswith("--workspace=") for flag in v10)  # removed in TensorRT 10
    v11, notes11 = tensorrt.trtexec_command("trtexec", 11, Path("m.onnx"), Path("m.engine"), shapes, fp16=True)
    assert "--fp16" not in v11 and "strongly typed" in notes11[0]


def test_static_batch_export_still_answers_any_batch_size(tmp_path):
    model, task = model_and_task("cnn")
    report = export_onnx(model, task.example_inputs(1), tmp_path / "model.onnx", task.input_names, None)
    runtime = OnnxRuntime(tmp_path / "model.onnx")
    assert report.parity_ok and runtime.static_batch == 1
    x = task.example_inputs(5, seed=4)
    with torch.inference_mode():
        assert np.allclose(runtime(*x), model(*x).numpy(), atol=1e-4)
