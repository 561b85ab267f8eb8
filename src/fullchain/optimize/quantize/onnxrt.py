"""The ONNX Runtime backend: static QDQ int8 (with calibration) or dynamic int8 of the exported model.

ONNX Runtime's quantiser works on the ONNX file: `quant_pre_process` (shape inference + graph cleanup),
then `quantize_static` in QDQ format (QuantizeLinear/DequantizeLinear pairs around each op, int8
per-channel weights, uint8 activations, MinMax calibration), which ORT's CPU provider fuses into
QLinearConv / QGemm / QLinearAdd kernels when the session is built. `quantize_dynamic` quantises only
MatMul/Gemm weights and computes activation scales per call: meant for Linear-heavy models (it made a
CNN slower here). The int8 file is the servable ``model.onnx``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from fullchain.errors import UserError

ONNX_FILE = "model.onnx"
INPUT_NAME = "input"
INT8_OP_TYPES = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "ConvInteger", "MatMulInteger",
                 "DynamicQuantizeMatMul", "DynamicQuantizeLinear")


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """fp32 ONNX export (dynamo exporter) with a dynamic batch dimension (and sequence, for token ids)."""
    dims = {0: "batch"}
    if example.dim() == 2 and not example.is_floating_point():
        dims[1] = "sequence"
    try:
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=True, input_names=[INPUT_NAME],
                          output_names=["logits"], dynamic_shapes=(dims,), verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user needs the reason
        raise UserError(f"quantize: ONNX export of {type(model).__name__} failed: {exc}") from None
    return path


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, calibration: Iterable[torch.Tensor]):
        self._it = iter([{INPUT_NAME: x.numpy()} for x in calibration])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_onnx(
    fp32_path: Path, out_path: Path, method: str, calibration: Iterable[torch.Tensor] = ()
) -> Path:
    """Quantise an fp32 ONNX file: static QDQ (ptq, qat) calibrated on `calibration`, or dynamic."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        if method == "dynamic":
            quantize_dynamic(str(pre), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
        else:
            quantize_static(str(pre), str(out_path), _Batches(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path


def session(path: Path, threads: int = 1, optimized_path: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the NCHWc "hardware specific" notice when writing the optimised graph
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predictor(path: Path, threads: int = 1):
    """A `predict(x) -> logits` over an ONNX Runtime session."""
    sess = session(path, threads)
    name = sess.get_inputs()[0].name

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x.numpy()})[0])

    return predict


def int8_kernels(path: Path) -> list[str]:
    """The int8 op types of the graph ONNX Runtime actually runs (after its QDQ fusions)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, optimized_path=optimized)
        ops = {node.op_type for node in onnx.load(str(optimized)).graph.node}
    return sorted(ops & set(INT8_OP_TYPES))
