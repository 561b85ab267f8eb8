"""The GPU suite's parts that a CPU machine can prove: its scripts parse, the carry list is derived from
constraints.txt and holds what the suite imports, and the GPU code paths of `amp` and `gpu-inference` run at toy
sizes on the CPU. (benchmarks/check_gpu_carry.sh, the clean-virtualenv proof, takes minutes: run by hand.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fullchain.bench import BENCHMARKS
from fullchain.bench.amp import Workload, run_synthetic

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["gpu_suite.sh", "prepare_gpu_carry.sh", "check_gpu_carry.sh"]
CARRY_BENCHES = ["amp", "fusion", "gpu-inference"]


def pins() -> dict[str, str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            out[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_suite_runs_registered_benchmarks():
    listed = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--benches"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert {"amp", "fusion", "gpu-inference", "serve"} <= set(listed) <= BENCHMARKS.keys()


@pytest.fixture(scope="module")
def carry():
    """The carry list for the suite's benchmarks that this file owns, and gpu_carry's notes."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_carry.py"), *CARRY_BENCHES],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = dict(line.split("==") for line in result.stdout.split())
    return listed, result.stderr


def test_carry_list_is_pinned_by_constraints_and_leaves_torch_out(carry):
    listed, _ = carry
    assert {"annotated-doc", "typer", "click", "rich", "pydantic", "pydantic-core", "numpy", "safetensors"} <= set(
        listed)
    constraints = pins()
    assert {name: constraints[name] for name in listed} == listed
    assert not {"torch", "typing-extensions", "sympy", "jinja2", "filelock"} & set(listed)


def test_optional_runtimes_are_not_carried(carry):
    listed, notes = carry
    assert "onnxruntime" not in listed and "onnx" not in listed
    assert "optional, not carried" in notes and "onnxruntime" in notes


def test_carry_holds_every_package_the_suite_imports(carry):
    """Import the suite's modules in a fresh interpreter: every third-party package loaded is carried or torch's."""
    listed, _ = carry
    script = ROOT / "benchmarks/gpu_carry.py"
    modules = subprocess.run([sys.executable, str(script), *CARRY_BENCHES, "--modules"], capture_output=True,
                             text=True, check=True).stdout.split()
    torch_brings = subprocess.run([sys.executable, str(script), *CARRY_BENCHES, "--provided"], capture_output=True,
                                  text=True, check=True).stdout.split()
    probe = ("import importlib, importlib.metadata as md, sys\n"
             "from packaging.utils import canonicalize_name\n"
             "for m in sys.argv[1:]: importlib.import_module(m)\n"
             "owners = md.packages_distributions()\n"
             "print(' '.join(sorted({canonicalize_name(d) for m in list(sys.modules) if '.' not in m\n"
             "                       for d in owners.get(m, []) if d != 'fullchain'})))")
    loaded = subprocess.run([sys.executable, "-c", probe, *modules], capture_output=True, text=True,
                            check=True).stdout.split()
    assert "pydantic" in loaded and set(loaded) - set(listed) - set(torch_brings) == set()
    assert "fullchain.bench.gpu_inference" in modules and "fullchain.cli" in modules


def test_amp_gpu_workloads_run_side_by_side_on_cpu():
    """The CUDA path of `ds bench amp` (synthetic batches on the device, both workload kinds) at toy sizes."""
    workloads = [
        Workload("cnn_toy", "cnn", {"num_classes": 5, "channels": 3, "widths": [8, 8, 8]}, batch=4,
                 input_shape=(3, 16, 16)),
        Workload("transformer_toy", "transformer", {"vocab_size": 50, "num_classes": 3, "d_model": 16, "n_heads": 2,
                                                    "n_layers": 1, "d_ff": 32, "max_length": 8},
                 batch=4, input_shape=(8,), vocab=50),
    ]
    record = run_synthetic(workloads, torch.device("cpu"), ["fp32", "bf16"], chunk_steps=1, chunks=2, quick=True,
                           n_batches=2)
    assert set(record.results) == {"cnn_toy/fp32", "cnn_toy/bf16", "transformer_toy/fp32", "transformer_toy/bf16"}
    for name, res in record.results.items():
        assert res["samples_per_s_min"] <= res["samples_per_s"] <= res["samples_per_s_max"], name
        assert res["skipped_steps"] == 0
    assert record.checks == {"cnn_toy/bf16_loss_finite": True, "transformer_toy/bf16_loss_finite": True}
    # bf16 trains the same model from the same start on the same batches: its held-out loss stays near fp32's
    for w in ("cnn_toy", "transformer_toy"):
        assert 0.8 < record.ratios[f"{w}/bf16_vs_fp32_heldout_loss"] < 1.25
        assert f"{w}/bf16_vs_fp32_speed" in record.ratios


@pytest.mark.slow
def test_gpu_inference_quick_on_cpu(tmp_path):
    """ONNX Runtime fp32 and int8 run through I/O binding beside eager; fp16 eager is skipped with its reason."""
    out = tmp_path / "gpu-inference.json"
    result = subprocess.run([sys.executable, "-m", "fullchain.cli", "bench", "gpu-inference", "--quick", "--device",
                             "cpu", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert {"eager_fp32", "ort_fp32", "ort_int8"} <= record["results"].keys()
    assert "CPU fp16 kernels are emulated" in record["results"]["eager_fp16"]["skipped"]
    assert record["checks"]["ort_fp32_within_0.001_of_fp32"] is True
    assert record["results"]["ort_int8"]["max_rel_error_vs_fp32"] > 0  # a quantised graph really ran
    assert "ort_int8_vs_ort_fp32_speed" in record["ratios"]


def test_unpinned_requirement_is_named(tmp_path):
    """A package the suite needs without a pin in constraints.txt stops the derivation, naming the package."""
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(line + "\n" for line in (ROOT / "constraints.txt").read_text().splitlines()
                                   if not line.startswith("annotated-doc==")))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_carry.py"), "amp", "--constraints",
                             str(constraints)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "constraints.txt pins no version of annotated-doc" in result.stderr
