"""Quantisation: QAT graphs that learn their scales, int8 kernels in the converted programs, servable artifacts,
and the accuracy-drop guard refusing a broken calibration. A small CNN trained for a few steps on a
Fashion-MNIST slice is the model throughout (skipped when the dataset is not installed)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from artifact_support import trained_cnn_artifact
from fullchain.artifact import read_meta
from fullchain.config import DataConfig, OptimizeConfig
from fullchain.data import build_data
from fullchain.errors import UserError

FASHION = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not FASHION.is_dir(), reason="needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist"
)
DATA = DataConfig(name="fashion_mnist", val_fraction=0.0, test_fraction=0.2, max_samples=2000)


@pytest.fixture(scope="module")
def bundle():
    return build_data(DATA, seed=0)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A CNN trained for 80 steps (about 70% test accuracy), saved with its data recipe."""
    return trained_cnn_artifact(tmp_path_factory.mktemp("fp32") / "model", DATA, {"widths": [16, 32, 64]}, steps=80)


def _model(artifact):
    from fullchain.artifact import load_artifact

    return load_artifact(artifact)[0]


def _images(bundle, n, split="train"):
    data = getattr(bundle, split)
    return torch.stack([data[i]["pixel_values"] for i in range(n)])


def test_qat_graph_holds_fake_quantizers_and_trainer_steps_update_their_scales(artifact, bundle):
    from fullchain.optimize.quantize import pt2e, qat

    example = _images(bundle, 2)
    prepared = pt2e.prepare_qat(_model(artifact), (example,))
    fake_quant = pt2e.fake_quant_modules(prepared)
    assert len(fake_quant) >= 10 and all("FakeQuantize" in type(m).__name__ for m in fake_quant.values())
    assert sum(n.op == "call_module" and n.target in fake_quant for n in prepared.graph.nodes) >= 10
    before = {name: m.scale.clone() for name, m in fake_quant.items()}
    weights_before = prepared.state_dict()["stem.0.weight"].clone()

    prepared, trainer = qat.finetune(_model(artifact), (example,), bundle.train, bundle.collate, steps=5, lr=1e-3)
    assert trainer.step == 5
    fake_quant = pt2e.fake_quant_modules(prepared)
    changed = [name for name, m in fake_quant.items() if not torch.equal(m.scale, before[name])]
    assert len(changed) >= len(fake_quant) // 2, "training steps must move the observed int8 scales"
    assert not torch.equal(prepared.state_dict()["stem.0.weight"], weights_before)


def test_ptq_inductor_converts_to_onednn_int8_kernels_and_the_saved_program_reloads(artifact, bundle, tmp_path):
    from fullchain.artifact.program import load_program
    from fullchain.optimize.quantize import pt2e

    model = _model(artifact)
    x = _images(bundle, 1, "test")
    converted = pt2e.quantize_ptq(model, (x,), [(_images(bundle, 128),)])
    ops = pt2e.graph_ops(converted)
    assert "quantized_decomposed.quantize_per_tensor.default" in ops
    kernels = pt2e.int8_kernels(converted, (x,))
    assert "onednn.qconv_pointwise.default" in kernels and "onednn.qlinear_pointwise.default" in kernels
    assert "onednn.qconv2d_pointwise.binary" in kernels  # the residual add fused into the int8 conv

    path = pt2e.save_program(converted, (x,), tmp_path / "model.pt2")
    program = load_program(tmp_path)  # compiled with Inductor freezing
    batch = _images(bundle, 16, "test")
    with torch.no_grad():
        reference, fp32 = converted(batch), model(batch)
        got = program(batch)
    assert torch.allclose(got, reference, atol=0.05)
    assert (got.argmax(1) == fp32.argmax(1)).float().mean() >= 0.85
    assert path.stat().st_size < 0.9 * (artifact / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_inductor_int8_artifact_is_served_from_its_program_not_its_float_weights(artifact, bundle, tmp_path):
    from fullchain.artifact import load as load_runtime
    from fullchain.artifact.program import load_program
    from fullchain.stages.quantize import quantize_artifact

    out = tmp_path / "int8"
    quantize_artifact(artifact, out, OptimizeConfig(quantize="ptq", backend="inductor", calib_samples=128))
    served = load_runtime(out)
    assert served.runtime.name == "torch"
    batch = _images(bundle, 4, "test")
    program = load_program(out, compile=False)
    with torch.no_grad():
        want = program(batch)
    assert torch.allclose(torch.from_numpy(served.runtime(batch)), want, atol=0.05)
    with pytest.raises(UserError, match="serve it with --runtime torch"):
        load_runtime(out, "onnxruntime")


def test_quantize_artifact_onnxruntime_writes_a_servable_qdq_int8_model(artifact, tmp_path):
    from fullchain.artifact import load as load_runtime
    from fullchain.stages.quantize import quantize_artifact

    out = tmp_path / "int8"
    report = quantize_artifact(artifact, out, OptimizeConfig(quantize="ptq", backend="onnxruntime", calib_samples=256))
    assert {"QLinearConv", "QGemm"} <= set(report["int8_kernels"])
    assert report["drop_points"] <= 1.0 and report["accuracy_quantized"] > 0.5
    assert report["size_bytes"]["int8"] < 0.5 * report["size_bytes"]["fp32"]
    assert report["latency_ms"]["int8"]["median"] > 0 and report["n"] == 400
    spec = read_meta(out)
    assert spec.extra["quantize"]["method"] == "ptq" and spec.extra["quantize"]["file"] == "model.onnx"

    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # the QDQ form ORT fuses into QLinearConv
    served = load_runtime(out)  # no runtime named: the int8 model's own, never the float weights beside it
    assert served.runtime.name == "onnxruntime"
    logits = served.runtime(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    with pytest.raises(UserError, match="serve it with --runtime onnxruntime"):
        load_runtime(out, "torch")
    from fullchain.stages.evaluate import evaluate_artifact

    scored = evaluate_artifact(out, split="test")  # ds evaluate scores the int8 model too
    assert abs(scored["accuracy"] - report["accuracy_quantized"]) <= 0.005


def test_guard_rejects_a_calibration_on_blank_images_and_writes_nothing(artifact, bundle, tmp_path):
    from fullchain.optimize.quantize import QuantizationRejected
    from fullchain.stages.quantize import quantize_artifact

    class Blank(torch.utils.data.Dataset):
        def __len__(self):
            return len(bundle.train)

        def __getitem__(self, i):
            sample = bundle.train[i]
            return {**sample, "pixel_values": torch.zeros_like(sample["pixel_values"])}

    broken = dataclasses.replace(bundle, train=Blank())
    out = tmp_path / "int8"
    with pytest.raises(QuantizationRejected) as caught:
        quantize_artifact(artifact, out, OptimizeConfig(quantize="ptq", backend="onnxruntime", calib_samples=256),
                          bundle=broken)
    message = str(caught.value)
    report = caught.value.report
    assert report["drop_points"] > 1.0
    assert f"{100 * report['accuracy_fp32']:.2f}%" in message
    assert f"{100 * report['accuracy_quantized']:.2f}%" in message
    assert "max_accuracy_drop" in message
    assert not out.exists()


def test_qat_artifact_keeps_its_trained_float_weights_and_stays_within_one_point(artifact, tmp_path):
    from safetensors.torch import load_file

    from fullchain.stages.quantize import quantize_artifact

    out = tmp_path / "qat"
    settings = OptimizeConfig(quantize="qat", backend="onnxruntime", qat_steps=30, calib_samples=256)
    report = quantize_artifact(artifact, out, settings)
    assert report["method"] == "qat" and report["qat_steps"] == 30 and report["drop_points"] <= 1.0
    assert "QLinearConv" in report["int8_kernels"]
    trained, original = load_file(out / "model.safetensors"), load_file(artifact / "model.safetensors")
    assert not torch.equal(trained["stem.0.weight"], original["stem.0.weight"])  # fine-tuned, not copied


def test_ds_optimize_quantize_writes_the_report_and_a_refusal_exits_2_keeping_nothing(artifact, tmp_path):
    ds = [sys.executable, "-m", "fullchain.cli", "optimize", str(artifact), "--quantize", "ptq",
          "--backend", "onnxruntime"]
    out = tmp_path / "ptq"
    ok = subprocess.run([*ds, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    section = json.loads((out / "optimize_report.json").read_text())["quantize"]
    assert section["method"] == "ptq" and section["drop_points"] <= 1.0 and (out / "model.onnx").is_file()

    # One calibration image mis-sizes the activation ranges (0.5 points lost here); no loss is allowed.
    refused = tmp_path / "refused"
    bad = subprocess.run([*ds, "--out", str(refused), "--calib-samples", "1", "--max-accuracy-drop", "0"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "quantisation rejected" in bad.stderr and "Traceback" not in bad.stderr
    assert not (refused / "model.onnx").exists()
