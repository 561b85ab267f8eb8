"""`ds optimize --quantize`: an fp32 model artifact in, a servable int8 artifact out, or a loud refusal.

The artifact's own data recipe (model.json) rebuilds its splits: calibration and QAT read the training
split, accuracy is measured on the held-out test split for fp32 and int8 alike. Batch-1 latency and the
size of the servable file are measured beside it. The guard then compares the accuracies; only a model
that passes is written to ``out_dir`` (model.json records the quantisation under ``extra.quantize``,
model.safetensors holds the float weights it came from, QAT-trained for QAT).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fullchain.artifact import META, WEIGHTS, ArtifactMeta, load_artifact, save_variant, text_encoding
from fullchain.config import DataConfig, OptimizeConfig
from fullchain.data import DataBundle, build_data
from fullchain.errors import UserError
from fullchain.optimize.quantize.flow import TrainingData, quantize_model
from fullchain.optimize.quantize.guard import check_accuracy_drop, drop_points
from fullchain.optimize.quantize.measure import accuracy, batches, latency_ms, size_bytes

CALIBRATION_BATCH = 64


def rebuild_data(model_dir: Path, spec: ArtifactMeta) -> DataBundle:
    if spec.data is None:
        raise UserError(f"{model_dir}: {META} records no training data; quantisation needs it for calibration")
    cfg = DataConfig.model_validate(spec.data["config"])
    return build_data(cfg, seed=spec.data["seed"], encoding=text_encoding(model_dir, spec))


def quantize_artifact(
    model_dir: str | Path, out_dir: str | Path, settings: OptimizeConfig, console: Console | None = None,
    bundle: DataBundle | None = None, trust_code: bool = False,
) -> dict[str, Any]:
    """Quantise the artifact per `settings` (quantize, backend, calib_samples, qat_*); returns the report section.

    Raises `QuantizationRejected` (nothing written) when the int8 model loses more than
    `settings.max_accuracy_drop` points of held-out accuracy.
    """
    console = console or Console(stderr=True)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    method, backend = settings.quantize, settings.backend
    model, spec = load_artifact(model_dir, trust_code=trust_code)
    bundle = bundle or rebuild_data(model_dir, spec)
    if bundle.test is None or len(bundle.test) == 0:
        raise UserError(f"{model_dir}: the recorded data has no test split to check the quantised accuracy on")
    task = spec.make_task()
    test = batches(bundle.test, task.collate, batch_size=64)
    # Inductor's frozen int8 programs are compiled per input shape: score them one sample at a time.
    test_int8 = batches(bundle.test, task.collate, batch_size=1) if backend == "inductor" else test
    example = tuple(x[:1] for x in task.model_inputs(test_int8[0]))
    calibration = [task.model_inputs(b)
                   for b in batches(bundle.train, task.collate, CALIBRATION_BATCH, settings.calib_samples)]
    training = TrainingData(bundle.train, bundle.collate, settings.qat_steps, settings.qat_lr,
                            seed=spec.data["seed"] if spec.data else 0)
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as staging:
        started = time.perf_counter()
        with console.status(f"quantising: {method} int8, {backend} backend"):
            q = quantize_model(model, task, method, backend, example, calibration, Path(staging), training, threads)
        seconds = time.perf_counter() - started
        with console.status("scoring fp32 and int8 on the test split, timing batch-1 latency"):
            acc_fp32 = accuracy(model, test, task)
            predict = q.predictor()
            acc_int8 = accuracy(predict, test_int8, task)
            lat_fp32, lat_int8 = latency_ms(model, example), latency_ms(predict, example)
        report = {
            "method": method, "backend": backend, "split": "test", "n": len(bundle.test), "threads": threads,
            "calib_samples": sum(len(xs[0]) for xs in calibration),
            "qat_steps": settings.qat_steps if method == "qat" else None,
            "accuracy_fp32": acc_fp32, "accuracy_quantized": acc_int8,
            "drop_points": round(drop_points(acc_fp32, acc_int8), 3),
            "max_accuracy_drop": settings.max_accuracy_drop,
            "latency_ms": {"fp32": lat_fp32, "int8": lat_int8},
            "speedup_batch1": lat_fp32["median"] / lat_int8["median"],
            "size_bytes": {"fp32": size_bytes(model_dir / WEIGHTS), "int8": size_bytes(q.file)},
            "int8_kernels": q.int8_kernels,
            "file": q.file.name, "quantize_seconds": round(seconds, 2),
        }
        check_accuracy_drop(report, settings.max_accuracy_drop)
        _write(out_dir, model_dir, q.float_model, spec, q.file, report)
    console.print(f"{method} int8 ({backend}): accuracy {100 * acc_fp32:.2f}% -> {100 * acc_int8:.2f}%, "
                  f"batch-1 latency {lat_fp32['median']:.3f} -> {lat_int8['median']:.3f} ms; written to {out_dir}")
    return report


def _write(out_dir: Path, model_dir: Path, float_model: torch.nn.Module, meta: ArtifactMeta, program: Path,
           report: dict[str, Any]) -> None:
    recorded = {k: report[k] for k in ("method", "backend", "file", "accuracy_fp32", "accuracy_quantized",
                                       "drop_points", "calib_samples", "qat_steps", "int8_kernels")}
    save_variant(out_dir, model_dir, float_model, meta, quantize=recorded)
    shutil.copy2(program, out_dir / program.name)
