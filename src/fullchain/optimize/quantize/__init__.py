"""Quantisation (MISSION C10): PTQ static int8, dynamic int8 and QAT, on two backends.

- ``inductor``: PT2E via torchao with the X86 Inductor quantizer, compiled by Inductor with freezing
  (`pt2e`); the artifact holds ``model.pt2``, loaded by `fullchain.artifact.program.load_program`.
- ``onnxruntime``: ONNX Runtime's static QDQ (or dynamic) quantisation of the exported model (`onnxrt`);
  the artifact holds ``model.onnx``, served through `fullchain.artifact.load`.

QAT (`qat`) fine-tunes with fake quantisation through the ordinary Trainer. `fullchain.stages.quantize` is
the `ds optimize --quantize` entry point; `guard` refuses a model that lost too much accuracy.
"""

from fullchain.optimize.quantize.guard import QuantizationRejected

__all__ = ["QuantizationRejected"]
