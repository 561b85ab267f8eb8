"""Real-time inference (MISSION C10): batch-1 latency and accuracy of fp32 and int8 CNNs on Fashion-MNIST.

The recipe of examples/realtime.yaml: train the ResNet-style CNN in fp32 with the Trainer, fold/fuse
Conv-BN-ReLU, QAT fine-tune (fake quantisation through the same Trainer), convert to int8. Contenders, all
from that one fp32 model: fp32 eager (what a user runs by default), fused fp32 (the graph passes'
fold_conv_bn + fuse_conv_bn_relu), fp32 compiled (Inductor with freezing), fp32 on ONNX Runtime (the
strongest fp32 baseline: int8's own gain is quoted against it), and PTQ / QAT int8 on each backend (PT2E +
Inductor; ONNX Runtime QDQ). Every contender gets the same thread count (torch's and the ORT session's
intra-op threads; ORT's idle threads sleep). For each thread count the contenders alternate in rounds of
batch-1 calls after a warm-up (rotating order): latency is each round's median (p99 within the round),
throughput is batch-1 images per second, ratios are paired round by round against fp32 eager and, for
int8 on ONNX Runtime, against fp32 on ONNX Runtime (median with its spread). Accuracy is measured once per
contender on the test split (the official 10k test images in the full setting).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

from fullchain.bench.harness import BenchRecord, alternate, summarise
from fullchain.config import DataConfig, ScheduleConfig, TrainConfig
from fullchain.data import build_data
from fullchain.models import build_model, model_args_from_data
from fullchain.optimize.measure import latency_samples, median_p99_ms
from fullchain.optimize.quantize import onnxrt
from fullchain.optimize.quantize.flow import TrainingData, finetune_qat, quantize_model
from fullchain.optimize.quantize.guard import drop_points
from fullchain.optimize.quantize.measure import accuracy, batches
from fullchain.optimize.quantize.pt2e import FrozenProgram
from fullchain.runtime.onnx import export_onnx
from fullchain.train.trainer import Trainer

Predict = Callable[[torch.Tensor], torch.Tensor]
HEADLINE = "qat_int8_onnxruntime"
FP32_ORT = "fp32_onnxruntime"


def _settings(quick: bool) -> dict:
    if quick:
        return {"max_samples": 4000, "model_args": {"widths": [16, 32, 64]}, "train_steps": 120, "qat_steps": 40,
                "calib_samples": 256, "threads": [1], "backends": ["onnxruntime"], "compiled": False,
                "calls_per_round": 100, "rounds": 5}
    return {"max_samples": None, "model_args": {}, "train_steps": 1800, "qat_steps": 300, "calib_samples": 512,
            "threads": [1, 2], "backends": ["inductor", "onnxruntime"], "compiled": True, "calls_per_round": 200,
            "rounds": 10}


@dataclass
class Contender:
    make: Callable[[int], Predict]  # threads -> predict (a fresh session / compiled program per thread count)
    size_bytes: int
    eval_batch: int = 64  # compiled programs are shape-specialised: scored one image at a time


def _weights_size(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


def _train_fp32(bundle, args: dict, steps: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(name="cnn", args=args)
    config = TrainConfig(max_steps=steps, batch_size=64, device="cpu", progress=False, tensorboard=False,
                         schedule=ScheduleConfig(warmup_steps=min(100, steps // 10)))
    Trainer(model, torch.optim.AdamW(model.parameters(), lr=2e-3), bundle.train, config=config,
            collate_fn=bundle.collate, seed=seed).fit()
    return model.eval()


def _fused(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    from fullchain.optimize.manager import PassManager

    fused, _ = PassManager(["fold_conv_bn", "fuse_conv_bn_relu"]).run(model, example)
    return fused.eval()


@torch.no_grad()
def _round(predict: Predict, example: tuple[torch.Tensor, ...], calls: int) -> dict[str, float]:
    samples = latency_samples(lambda: predict(*example), calls, warmup=0)
    median, p99 = median_p99_ms(samples)
    return {"latency_ms": median, "p99_ms": p99, "images_per_s": calls / sum(samples)}


def _contenders(model, task, example, calibration, training, s, work: Path) -> tuple[dict[str, Contender], dict]:
    contenders = {"fp32_eager": Contender(lambda t: model, _weights_size(model))}
    fused = _fused(model, example)
    contenders["fused_fp32"] = Contender(lambda t: fused, _weights_size(fused))
    if s["compiled"]:
        contenders["fp32_compiled"] = Contender(lambda t: FrozenProgram(copy.deepcopy(model)),
                                                _weights_size(model), eval_batch=1)
    fp32_onnx = work / "fp32.onnx"
    export_onnx(model, example, fp32_onnx, task.input_names, task.dynamic_dims())
    contenders[FP32_ORT] = Contender(lambda t: onnxrt.predictor(fp32_onnx, t), fp32_onnx.stat().st_size)
    kernels = {}
    started = time.perf_counter()
    qat_graph = finetune_qat(model, example, training)
    qat_seconds = time.perf_counter() - started
    # onnxruntime first: the inductor conversion consumes the QAT graph
    for method in ("ptq", "qat"):
        for backend in sorted(s["backends"], reverse=True):
            q = quantize_model(model, task, method, backend, example, calibration, work / f"{method}_{backend}",
                               training, qat_graph=qat_graph)
            name = f"{method}_int8_{backend}"
            contenders[name] = Contender(q.predictor, q.file.stat().st_size, 1 if backend == "inductor" else 64)
            kernels[name] = q.int8_kernels
    return contenders, {"int8_kernels": kernels, "qat_finetune_s": round(qat_seconds, 1)}


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    s = _settings(quick)
    seed = 0
    start_threads = torch.get_num_threads()
    data_cfg = DataConfig(name="fashion_mnist", val_fraction=0.0, test_fraction=0.2, max_samples=s["max_samples"])
    bundle = build_data(data_cfg, seed=seed)
    args = model_args_from_data("cnn", bundle.input_spec, s["model_args"])
    model = _train_fp32(bundle, args, s["train_steps"], seed)
    task = bundle.task
    test64 = batches(bundle.test, task.collate, 64)
    test1 = batches(bundle.test, task.collate, 1)
    example = task.model_inputs(test1[0])
    calibration = [task.model_inputs(b) for b in batches(bundle.train, task.collate, 64, s["calib_samples"])]
    training = TrainingData(bundle.train, bundle.collate, s["qat_steps"], lr=1e-4, seed=seed)

    with tempfile.TemporaryDirectory() as work:
        contenders, info = _contenders(model, task, example, calibration, training, s, Path(work))
        results: dict[str, dict] = {name: {} for name in contenders}
        all_rounds: dict[int, dict] = {}
        for threads in s["threads"]:
            torch.set_num_threads(threads)
            predictors = {name: c.make(threads) for name, c in contenders.items()}
            calls = {name: (lambda p=p: _round(p, example, s["calls_per_round"])) for name, p in predictors.items()}
            rounds = alternate(calls, repeats=s["rounds"], warmup=1)
            all_rounds[threads] = rounds
            for name, summary in summarise(rounds).items():
                results[name].update({f"{k}_{threads}t": v for k, v in summary.items()})
            if threads == s["threads"][0]:
                for name, c in contenders.items():
                    results[name]["accuracy"] = accuracy(predictors[name], test1 if c.eval_batch == 1 else test64,
                                                         task)
                    results[name]["size_bytes"] = c.size_bytes
        torch.set_num_threads(start_threads)

    fp32_acc = results["fp32_eager"]["accuracy"]
    record = BenchRecord(
        bench="realtime",
        settings={
            "quick": quick,
            "data": f"fashion_mnist: {len(bundle.train)} train, {len(bundle.test)} test (official t10k"
                    f"{' slice' if s['max_samples'] else ''})",
            "model": "cnn", "model_args": args, "fp32_train_steps": s["train_steps"], "batch_size": 64,
            "qat_steps": s["qat_steps"], "qat_lr": 1e-4, "calib_samples": s["calib_samples"],
            "threads": s["threads"], "calls_per_round": s["calls_per_round"], "rounds": s["rounds"],
            "latency": "batch 1; median of each round's median (p99 within a round of calls), ms",
            "headline": f"int8_latency_speedup = fp32_eager / {HEADLINE} batch-1 latency at {s['threads'][0]} thread;"
                        f" int8_vs_fp32_ort_latency = {FP32_ORT} / {HEADLINE} (int8's own gain on one runtime)",
            "same_threads": "torch.set_num_threads and each ORT session's intra_op_num_threads = the thread count",
            **info,
        },
        results=results,
    )
    for threads, rounds in all_rounds.items():
        for name in contenders:
            if name != "fp32_eager":
                record.add_ratio(f"{name}_speedup_{threads}t", rounds, "fp32_eager", name, "latency_ms")
            if name.endswith("_int8_onnxruntime"):
                record.add_ratio(f"{name}_vs_fp32_ort_speedup_{threads}t", rounds, FP32_ORT, name, "latency_ms")
    first = s["threads"][0]
    for headline, source in (("int8_latency_speedup", f"{HEADLINE}_speedup_{first}t"),
                             ("int8_vs_fp32_ort_latency", f"{HEADLINE}_vs_fp32_ort_speedup_{first}t")):
        record.ratios[headline] = record.ratios[source]
        record.ratio_spreads[headline] = record.ratio_spreads[source]
    qat_names = [n for n in contenders if n.startswith("qat_")]
    for name in qat_names + [n for n in contenders if n.startswith("ptq_")]:
        record.ratios[f"{name}_accuracy_drop_points"] = drop_points(fp32_acc, results[name]["accuracy"])
    record.checks["qat_accuracy_drop_le_1pt"] = all(
        record.ratios[f"{n}_accuracy_drop_points"] <= 1.0 for n in qat_names)
    for name, ops in info["int8_kernels"].items():
        record.checks[f"{name}_runs_int8_kernels"] = bool(ops)
    record.checks["fused_fp32_accuracy_equal"] = abs(results["fused_fp32"]["accuracy"] - fp32_acc) < 1e-9
    record.checks["goal_int8_speedup_ge_3.2x"] = record.ratios["int8_latency_speedup"] >= 3.2
    return record
