"""The ONNX Runtime backend: static QDQ int8 (with calibration) or dynamic int8 of the exported model.

ONNX Runtime's quantiser works on the ONNX file: `quant_pre_process` (shape inference + graph cleanup),
then `quantize_static` in QDQ format (QuantizeLinear/DequantizeLinear pairs around each op, int8
per-channel weights, uint8 activations, MinMax calibration), which ORT's CPU provider fuses into
QLinearConv / QGemm / QLinearAdd kernels when the session is built. `quantize_dynamic` quantises only
MatMul/Gemm weights and computes activation scales per call: meant for Linear-heavy models (it made a
CNN slower here). The int8 file is the servable ``model.onnx``.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from fullchain.runtime.sessions import OnnxRuntime

INT8_OP_TYPES = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "ConvInteger", "MatMulInteger",
                 "DynamicQuantizeMatMul", "DynamicQuantizeLinear")


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, calibration: Iterable[tuple[torch.Tensor, ...]], input_names: Sequence[str]):
        self._it = iter([{name: x.numpy() for name, x in zip(input_names, xs, strict=True)} for xs in calibration])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_onnx(
    fp32_path: Path, out_path: Path, method: str, calibration: Iterable[tuple[torch.Tensor, ...]] = (),
    input_names: Sequence[str] = (),
) -> Path:
    """Quantise an fp32 ONNX file: static QDQ (ptq, qat) calibrated on `calibration`, or dynamic."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # ORT's symbolic shape inference gives up on some graphs (an exported BERT: "Incomplete symbolic shape
        # inference"), writing a debug copy of the model into the working directory as it does; ONNX's own shape
        # inference is then enough to quantise. Running it from the temporary directory keeps that copy there.
        with contextlib.chdir(tmp):
            try:
                quant_pre_process(str(fp32_path), str(pre))
            except Exception:  # noqa: BLE001 - see above
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        if method == "dynamic":
            quantize_dynamic(str(pre), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
        else:
            quantize_static(str(pre), str(out_path), _Batches(calibration, input_names), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path


def predictor(path: Path, threads: int = 1) -> Callable[..., torch.Tensor]:
    """A `predict(*inputs) -> logits` over an ONNX Runtime session whose idle threads sleep instead of spinning
    (measured beside PyTorch contenders, ORT's spinning threads would starve them; see `ort_session`)."""
    session = OnnxRuntime(path, threads, spinning=False)
    return lambda *xs: torch.from_numpy(session(*xs))


def int8_kernels(path: Path) -> list[str]:
    """The int8 op types of the graph ONNX Runtime actually runs (after its QDQ fusions)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the NCHWc "hardware specific" notice when writing the optimised graph
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = {node.op_type for node in onnx.load(str(optimized)).graph.node}
    return sorted(ops & set(INT8_OP_TYPES))
