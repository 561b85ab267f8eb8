"""Inference precision and runtime: eager PyTorch fp32 and fp16 against ONNX Runtime (fp32, fp16, int8) and
TensorRT (fp16, int8 through ONNX Runtime's TensorRT provider), on one model, inputs already on the device.

On CUDA the model is ResNet-50 at 224 px, batch 32; on the CPU (and with ``--quick``) the small ResNet-style CNN
at 28 px, batch 8. Every runtime reads and writes device memory in place (ONNX Runtime through I/O binding over
the torch tensors), so no contender pays for a host copy the others skip. int8 is ONNX Runtime's static QDQ
quantisation (`fullchain.optimize.quantize.onnxrt`) calibrated on the same synthetic images; fp16 for ONNX
Runtime is the fp32 graph converted by ONNX Runtime's own float16 tool. Contenders run alternately in rotating
order after a warm-up; each round times `CALLS` calls. Each contender's outputs are compared with fp32 eager
(largest error relative to the largest output).

A runtime that is not installed, or whose provider this machine lacks, is skipped with the reason in the record
(the GPU machine gets onnxruntime-gpu (~244 MB) and TensorRT (over 1 GB) only where they are installed: neither
fits the device call's 64 MiB of carried wheels).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fullchain.bench.harness import BenchRecord, alternate, summarise
from fullchain.distributed.strategy import resolve_device
from fullchain.models import RESNET_PRESETS, build_model

CALLS = 10  # calls per timed round
BASELINE = "eager_fp32"
FP32_REL_TOLERANCE = 1e-3  # largest |output - eager fp32| relative to eager's largest output
LOW_PRECISION_REL_BOUND = 0.25  # fp16 and int8: catches a broken graph, not a precision loss


def _workload(cuda: bool, quick: bool) -> dict:
    if cuda and not quick:
        return {"model": "resnet50", "args": {**RESNET_PRESETS["resnet50"], "num_classes": 1000}, "batch": 32,
                "size": 224, "channels": 3, "repeats": 7}
    return {"model": "cnn", "args": {"num_classes": 10, "channels": 1}, "batch": 8, "size": 28, "channels": 1,
            "repeats": 3 if quick else 7}


def _timed(fn: Callable[[], object], device: torch.device) -> Callable[[], dict[str, float]]:
    def round_() -> dict[str, float]:
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms = 1000 * (time.perf_counter() - start) / CALLS
        return {"latency_ms": ms}

    return round_


def _ort_contenders(model: nn.Module, x: torch.Tensor, tmp: Path) -> tuple[dict[str, Callable], dict[str, str]]:
    """ONNX Runtime and TensorRT contenders that this machine can run, and the reason for each it cannot.

    Each returned callable runs the model on `x` in place and returns the output tensor (on x's device)."""
    cuda = x.is_cuda
    wanted = ["ort_fp32", "ort_int8"] + (["ort_fp16", "tensorrt_fp16", "tensorrt_int8"] if cuda else [])
    try:
        import onnx  # noqa: F401 - the exporter and the fp16 conversion need it
        import onnxruntime as ort
    except ImportError as exc:
        return {}, dict.fromkeys(wanted, f"onnxruntime and onnx are needed ({exc})")
    available = ort.get_available_providers()
    main = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    if main not in available:
        hint = (" (this is the CPU build: the CUDA provider comes with onnxruntime-gpu, ~244 MB, too large to carry"
                " in a 64 MiB device call)") if cuda else ""
        return {}, dict.fromkeys(wanted, f"onnxruntime {ort.__version__} has no {main}; "
                                         f"providers: {', '.join(available)}{hint}")
    try:
        graphs = _onnx_graphs(model, x, tmp, fp16=cuda)
    except Exception as exc:  # noqa: BLE001 - export or quantisation failed: every ORT contender is skipped
        return {}, dict.fromkeys(wanted, f"ONNX export or quantisation failed: {type(exc).__name__}: {exc}"[:300])

    device_id = x.device.index or 0
    plans = {"ort_fp32": ("fp32", [(main, {"device_id": device_id})] if cuda else [main]),
             "ort_int8": ("int8", [(main, {"device_id": device_id})] if cuda else [main])}
    if cuda:
        plans["ort_fp16"] = ("fp16", [(main, {"device_id": device_id})])
        trt_cache = str(tmp / "trt-cache")
        for name, graph, int8 in (("tensorrt_fp16", "fp32", False), ("tensorrt_int8", "int8", True)):
            plans[name] = (graph, [("TensorrtExecutionProvider", {
                "device_id": device_id, "trt_fp16_enable": True, "trt_int8_enable": int8,
                "trt_engine_cache_enable": True, "trt_engine_cache_path": trt_cache})])
    contenders, skipped = {}, {}
    for name, (graph, providers) in plans.items():
        provider = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if provider not in available:
            skipped[name] = (f"onnxruntime {ort.__version__} has no {provider}; providers: {', '.join(available)} "
                             "(TensorRT's libraries, over 1 GB, are more than a 64 MiB device call carries)")
            continue
        try:
            session = ort.InferenceSession(str(graphs[graph]), providers=providers)
            if session.get_providers()[0] != provider:
                raise RuntimeError(f"the session fell back to {session.get_providers()[0]}")
            contenders[name] = _bound(session, x.half() if graph == "fp16" else x)
        except Exception as exc:  # noqa: BLE001 - a provider that cannot build this graph: recorded, not fatal
            skipped[name] = f"{type(exc).__name__}: {exc}"[:300]
    return contenders, skipped


def _onnx_graphs(model: nn.Module, x: torch.Tensor, tmp: Path, fp16: bool) -> dict[str, Path]:
    """fp32, int8 (static QDQ) and, when asked, fp16 ONNX files of `model`, exported from a CPU copy."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from fullchain.optimize.quantize.onnxrt import quantize_onnx
    from fullchain.runtime.onnx import export_onnx

    cpu_model = copy.deepcopy(model).float().cpu().eval()
    example = x[:2].float().cpu()
    graphs = {"fp32": tmp / "fp32.onnx"}
    export_onnx(cpu_model, (example,), graphs["fp32"], ["inputs"], dynamic_dims={"inputs": {0: "batch"}})
    calibration = [(x[i:i + 2].float().cpu(),) for i in range(0, min(len(x), 8), 2)]
    graphs["int8"] = quantize_onnx(graphs["fp32"], tmp / "int8.onnx", "ptq", calibration, ["inputs"])
    if fp16:
        graphs["fp16"] = tmp / "fp16.onnx"
        onnx.save(convert_float_to_float16(onnx.load(str(graphs["fp32"]))), str(graphs["fp16"]))
    return graphs


def _bound(session, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A call of `session` that reads `x` and writes its output where torch can read it, without host copies."""
    import numpy as np

    first = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0]
    out = torch.empty(first.shape, dtype=torch.from_numpy(first).dtype, device=x.device)
    binding = session.io_binding()
    kind, index = x.device.type, x.device.index or 0
    np_type = {torch.float32: np.float32, torch.float16: np.float16}
    binding.bind_input(session.get_inputs()[0].name, kind, index, np_type[x.dtype], tuple(x.shape), x.data_ptr())
    binding.bind_output(session.get_outputs()[0].name, kind, index, np_type[out.dtype], tuple(out.shape),
                        out.data_ptr())

    def call() -> torch.Tensor:
        session.run_with_iobinding(binding)
        return out

    return call


def run(quick: bool = False, device: str = "auto") -> BenchRecord:
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    w = _workload(cuda, quick)
    torch.manual_seed(0)
    model = build_model(name="cnn", args=w["args"]).eval().to(dev)
    x = torch.randn(w["batch"], w["channels"], w["size"], w["size"], generator=torch.Generator().manual_seed(1))
    x = x.to(dev)
    half = copy.deepcopy(model).half()
    x_half = x.half()

    def eager(m: nn.Module, inputs: torch.Tensor) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                return m(inputs)

        return call

    calls: dict[str, Callable[[], torch.Tensor]] = {BASELINE: eager(model, x)}
    skipped: dict[str, str] = {}
    if cuda:
        calls["eager_fp16"] = eager(half, x_half)
    else:
        skipped["eager_fp16"] = "fp16 eager is a GPU figure (CPU fp16 kernels are emulated)"
    with tempfile.TemporaryDirectory() as tmp:
        ort_calls, ort_skipped = _ort_contenders(model, x, Path(tmp))
        calls.update(ort_calls)
        skipped.update(ort_skipped)
        reference = calls[BASELINE]().float()
        errors = {name: float((fn().float() - reference).abs().max() / reference.abs().max())
                  for name, fn in calls.items()}
        rounds = alternate({name: _timed(fn, dev) for name, fn in calls.items()}, repeats=w["repeats"], warmup=2)
    results = summarise(rounds)
    for name in calls:
        results[name]["max_rel_error_vs_fp32"] = errors[name]
    for name, reason in skipped.items():
        results[name] = {"skipped": reason}

    record = BenchRecord(
        bench="gpu-inference",
        settings={"quick": quick, "device": str(dev), "model": w["model"], "batch": w["batch"],
                  "image_px": w["size"], "calls_per_round": CALLS, "rounds": w["repeats"],
                  "inputs": "unit-normal images, random-init weights (latency does not depend on the values)"},
        results=results,
    )
    for name in calls:
        if name != BASELINE:
            record.ratios[f"{name}_vs_{BASELINE}_speed"] = _speedup(rounds, BASELINE, name)
    if {"ort_int8", "ort_fp32"} <= calls.keys():
        record.ratios["ort_int8_vs_ort_fp32_speed"] = _speedup(rounds, "ort_fp32", "ort_int8")
    if {"tensorrt_int8", "tensorrt_fp16"} <= calls.keys():
        record.ratios["tensorrt_int8_vs_tensorrt_fp16_speed"] = _speedup(rounds, "tensorrt_fp16", "tensorrt_int8")
    for name in [n for n in calls if n != BASELINE]:  # fp32 runtimes match eager; fp16, int8 bounded loosely
        bound = FP32_REL_TOLERANCE if name.endswith("fp32") else LOW_PRECISION_REL_BOUND
        record.checks[f"{name}_within_{bound:g}_of_fp32"] = errors[name] <= bound
    record.notes += [f"skipped {name}: {reason}" for name, reason in skipped.items()]
    return record


def _speedup(rounds: dict[str, list[dict[str, float]]], slow: str, fast: str) -> float:
    """Median over rounds of slow's latency / fast's latency, pair by pair."""
    return statistics.median(a["latency_ms"] / b["latency_ms"] for a, b in zip(rounds[slow], rounds[fast], strict=True))
