"""The stages of a run, one module each; every stage reads the files the one before it wrote.

- `train`: run file -> ``runs/<name>/model`` (`ds train`)
- `evaluate`: an artifact -> test figures, and the text baseline on the same split (`ds evaluate`)
- `gates`: the new model's figures against limits and the model in production (`ds evaluate --gate`)
- `ab`: two artifacts on the same examples: McNemar, bootstrap intervals, latency, a verdict (`ds ab`)
- `optimize` / `quantize`: an artifact -> an optimised or int8 artifact and its report (`ds optimize`)
- `export`: an artifact -> ONNX / TensorRT beside it, with parity (`ds export`)
- `serve`: an artifact served under load for a few seconds (the serving itself is `ds serve`)
- `report`: the run's report.html
- `run`: all of them in order, with failures recorded and the later stages run on the last good artifact
- `profile`: a few training steps under the profiler (`ds profile`)
"""
