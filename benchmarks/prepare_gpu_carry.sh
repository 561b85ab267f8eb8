#!/usr/bin/env bash
# Prepares what benchmarks/gpu_suite.sh needs on the offline GPU machine (Python 3.12, PyTorch preinstalled):
# .whl/ with fullchain's pure-Python dependencies and .data/fashion-mnist/ with the dataset files.
# Both folders are git-ignored; name them in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic pydantic-core annotated-types typing-inspection typing-extensions pyyaml typer click \
  shellingham rich markdown-it-py mdurl pygments safetensors tokenizers
cp -r /usr/share/datasets/fashion-mnist .data/
du -sh .whl .data
