"""Running a model for inference (a torch module or an ONNX Runtime session) and exporting it to ONNX.

Below `optimize`, `artifact` and `deploy`, which all use it; it imports nothing of theirs.
"""

from fullchain.runtime.onnx import OUTPUT_NAME, ExportReport, compare_latency, export_onnx
from fullchain.runtime.sessions import OnnxRuntime, Runtime, TorchRuntime, default_threads, ort_session

__all__ = ["OUTPUT_NAME", "ExportReport", "OnnxRuntime", "Runtime", "TorchRuntime", "compare_latency",
           "default_threads", "export_onnx", "ort_session"]
