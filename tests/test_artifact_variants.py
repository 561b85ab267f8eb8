"""Every variant of a model directory exports, evaluates and serves as what it is (issue 13): an int8 ONNX
artifact stays int8 wherever it is exported to, an Inductor int8 program and a bf16 model are refused in one
line, a compiled artifact exports its plain graph and still compiles when loaded, an exported ``model.onnx``
scores like its directory, ``--passes none`` changes nothing, and ``ds run`` survives a failed optimise stage.

A small CNN trained for a few steps on a Fashion-MNIST slice is the image model (skipped when the dataset is
not installed); a one-layer Transformer on BBC News is the text model."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from artifact_support import trained_cnn_artifact
from fullchain.artifact import load, load_artifact, read_meta
from fullchain.config import DataConfig, OptimizeConfig
from fullchain.optimize.capture import capture
from fullchain.runtime import OnnxRuntime
from fullchain.stages.evaluate import evaluate_artifact
from fullchain.stages.optimize import optimize_artifact

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not FASHION.is_dir(), reason="needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist"
)
DATA = DataConfig(name="fashion_mnist", val_fraction=0.0, test_fraction=0.2, max_samples=1000)


def ds(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fullchain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COLUMNS": "200", **(env or {})})


def one_line_refusal(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ds_evaluate(target: Path, json_path: Path) -> dict:
    result = ds("evaluate", target, "--json", json_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(json_path.read_text())


@pytest.fixture(scope="module")
def cnn_artifact(tmp_path_factory) -> Path:
    """A CNN trained for 60 steps, saved with its data recipe (so ds evaluate rebuilds its test split)."""
    return trained_cnn_artifact(tmp_path_factory.mktemp("cnn") / "model", DATA,
                                {"widths": [8, 16], "blocks_per_stage": [1, 1]}, steps=60)


@pytest.fixture(scope="module")
def int8_artifact(cnn_artifact, tmp_path_factory) -> Path:
    from fullchain.stages.quantize import quantize_artifact

    out = tmp_path_factory.mktemp("int8") / "model"
    quantize_artifact(cnn_artifact, out, OptimizeConfig(quantize="ptq", backend="onnxruntime", calib_samples=128))
    return out


def copy_of(artifact: Path, tmp_path: Path) -> Path:
    """A private copy for a test that writes into the directory."""
    return Path(shutil.copytree(artifact, tmp_path / artifact.parent.name))


# --- int8 ---------------------------------------------------------------------------------------------------


def test_int8_onnx_artifact_exports_as_its_int8_graph_and_scores_like_it(int8_artifact, tmp_path):
    int8 = copy_of(int8_artifact, tmp_path)
    graph, meta = digest(int8 / "model.onnx"), digest(int8 / "model.json")
    in_place = ds("export", int8)
    assert in_place.returncode == 0, in_place.stderr[-2000:]
    assert digest(int8 / "model.onnx") == graph and digest(int8 / "model.json") == meta  # never re-exported fp32

    other = tmp_path / "other" / "model.onnx"
    elsewhere = ds("export", int8, "--out", other)
    assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]
    assert "kept as quantised" in " ".join(elsewhere.stdout.split())
    import onnx

    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(other)).graph.node}
    assert digest(other) == graph
    assert read_meta(other.parent).extra["quantize"]["method"] == "ptq"  # model.json beside it still says int8

    exported, artifact = ds_evaluate(other, tmp_path / "scores.json"), evaluate_artifact(int8)
    assert exported["confusion_matrix"] == artifact["confusion_matrix"] and exported["n"] == artifact["n"] == 200
    assert abs(exported["accuracy"] - read_meta(int8).extra["quantize"]["accuracy_quantized"]) <= 0.005


@pytest.mark.slow
def test_inductor_int8_program_export_is_refused_in_one_line(cnn_artifact, tmp_path):
    from fullchain.stages.quantize import quantize_artifact

    program = tmp_path / "int8-inductor"
    quantize_artifact(cnn_artifact, program, OptimizeConfig(quantize="ptq", backend="inductor", calib_samples=64))
    line = one_line_refusal(ds("export", program))
    assert "inductor backend has no ONNX form" in line and "--backend onnxruntime" in line
    assert not (program / "model.onnx").exists()


# --- bf16, compiled, float ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [
    pytest.param("cnn", id="cnn"),
    pytest.param("text", id="transformer"),
])
def test_bf16_artifact_export_is_refused_naming_the_operator_and_leaves_no_onnx(model, request, tmp_path):
    source = request.getfixturevalue({"cnn": "cnn_artifact", "text": "bbc_transformer"}[model])
    bf16 = tmp_path / "bf16"
    optimize_artifact(source, bf16, OptimizeConfig(precision="bf16"), evaluate=False, repeats=1)
    assert read_meta(bf16).extra["optimize"]["precision"] == "bf16"

    line = one_line_refusal(ds("export", bf16))
    assert "a bf16 artifact has no ONNX form ONNX Runtime can run (no bf16 kernel for " in line
    assert model != "cnn" or "kernel for Conv" in line
    assert str(source) in line  # points at the fp32 artifact that does export
    assert not (bf16 / "model.onnx").exists()  # nothing half-made for ds serve --runtime onnxruntime to pick up
    served = load(bf16)  # the artifact itself still serves, in torch
    logits = served.runtime(*served.task.example_inputs(2))
    assert logits.shape[0] == 2 and np.isfinite(logits).all()


@pytest.mark.slow
def test_compiled_artifact_exports_its_plain_graph_and_still_loads_compiled(cnn_artifact, tmp_path):
    compiled = tmp_path / "compiled"
    optimize_artifact(cnn_artifact, compiled, OptimizeConfig(compile=True), evaluate=False, repeats=1)
    result = ds("export", compiled)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "dynamo exporter" in " ".join(result.stdout.split())
    assert read_meta(compiled).extra["optimize"]["compile"] is True  # compiling stays the runtime's choice

    served = load(compiled)  # what ds serve runs for this directory
    assert type(served.runtime.model).__name__ == "OptimizedModule"  # torch.compile's wrapper
    x = served.task.example_inputs(4, seed=5)
    assert np.allclose(served.runtime(*x), OnnxRuntime(compiled / "model.onnx")(*x), atol=1e-4)


def test_exported_float_onnx_finds_its_model_json_and_scores_like_its_directory(cnn_artifact, tmp_path):
    artifact = copy_of(cnn_artifact, tmp_path)
    result = ds("export", artifact)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = ds_evaluate(artifact / "model.onnx", tmp_path / "scores.json")
    original = evaluate_artifact(artifact)
    assert exported["confusion_matrix"] == original["confusion_matrix"] and exported["n"] == 200
    assert exported["accuracy"] == original["accuracy"] and abs(exported["loss"] - original["loss"]) < 1e-4


# --- no passes ----------------------------------------------------------------------------------------------


def _structure(directory: Path) -> tuple[list, dict]:
    model, spec = load_artifact(directory)
    graph = capture(model, spec.make_task().example_inputs(2)).graph
    nodes = [(n.op, str(n.target)) for n in graph.nodes]
    return nodes, {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("how", ["ds optimize --passes none", "run file passes: []"])
def test_no_passes_apply_no_pass_and_keep_the_graph(how, cnn_artifact, tmp_path):
    out = tmp_path / "optimized"
    if how.startswith("ds"):
        result = ds("optimize", cnn_artifact, "--out", out, "--passes", "none", "--no-eval")
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads((out / "optimize_report.json").read_text())
    else:
        settings = OptimizeConfig.model_validate(yaml.safe_load("enabled: true\npasses: []"))
        report = optimize_artifact(cnn_artifact, out, settings, evaluate=False, repeats=1)
    assert report["passes"] == [] and read_meta(out).extra["optimize"]["passes"] == []
    nodes, weights = _structure(out)
    assert (nodes, weights) == _structure(cnn_artifact)
    assert any("bn" in target or "norm" in target for _, target in nodes)  # fold_conv_bn would have removed these


# --- ds run with a stage that fails -------------------------------------------------------------------------

GATED_NET = '''
import torch
from torch import nn


class GatedNet(nn.Module):
    def __init__(self, num_features, num_classes, hidden=32):
        super().__init__()
        self.hidden, self.out = nn.Linear(num_features, hidden), nn.Linear(hidden, num_classes)

    def forward(self, pixel_values):
        h = self.hidden(pixel_values.flatten(1))
        if (h < 0).any():  # ReLU only when some unit is negative: a branch on tensor values
            h = torch.relu(h)
        return self.out(h)
'''


@pytest.mark.slow  # about 15-20 s: train, export, a real server under load
def test_ds_run_records_a_failed_optimise_stage_and_deploys_the_trained_model(tmp_path):
    package = tmp_path / "pkgs"
    package.mkdir()
    (package / "fc_gated_net.py").write_text(textwrap.dedent(GATED_NET))
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "name": "gated", "runs_dir": str(tmp_path / "runs"), "model": {"target": "fc_gated_net:GatedNet"},
        "data": {"name": "fashion_mnist", "max_samples": 500, "val_fraction": 0.0},
        "train": {"max_steps": 10, "batch_size": 32, "progress": False, "tensorboard": False},
        "checkpoint": {"enabled": False},
        "optimize": {"enabled": True}, "export": {"enabled": True},
        "serve": {"enabled": True, "load_seconds": 1, "load_concurrency": 2},
    }))
    result = ds("run", run, env={"PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "stage(s) failed: optimize" in " ".join(result.stderr.split())

    run_dir = tmp_path / "runs" / "gated"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_stages"] == ["optimize"]
    failed = summary["optimize"]
    assert failed["status"] == "failed" and str(run_dir / "model") in failed["hint"]
    assert "cannot capture GatedNet into a graph" in failed["error"] and "if (h < 0).any()" in failed["error"]
    assert not (run_dir / "model-optimized").exists()
    assert summary["deployed_model_dir"] == str(run_dir / "model")
    assert summary["export"]["status"] == "ok" and summary["export"]["parity_ok"] is True
    assert (run_dir / "model" / "model.onnx").is_file()
    serve = summary["serve"]
    assert serve["status"] == "ok" and set(serve["statuses"]) == {"200"} and serve["statuses"]["200"] > 0
