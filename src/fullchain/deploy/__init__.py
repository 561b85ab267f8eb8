"""Deployment: ONNX/TensorRT export with parity checks, serving runtimes (torch, ONNX Runtime) and `ds serve`.

Modules: `export` (ONNX + parity), `tensorrt` (engine builds), `runtimes` (one loader for every servable
file), `preprocess` (raw request items -> model tensors, exactly as training encoded them), `schema`
(request/response models), `batching` (the dynamic batcher), `metrics` (Prometheus series), `split` (live
A/B: which of two models answers a request), `server` (the FastAPI app and its uvicorn runner), `process`
and `loadgen` (a server subprocess and a closed-loop load generator, shared by tests, `ds bench serve` and
`ds run`).
"""
