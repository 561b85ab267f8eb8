#!/usr/bin/env bash
# Proves benchmarks/gpu_suite.sh starts on the bare GPU machine with only the carried wheels (.whl/, made by
# prepare_gpu_carry.sh) and torch, in two clean virtualenvs that see nothing else (no system site-packages):
#
# 1. CPython 3.12, the GPU machine's Python: exactly .whl/*.whl installed, plus what torch requires (typing-extensions,
#    sympy...: the GPU machine has them with its torch) at the project's pins. Every wheel installs for cp312, `pip
#    check` finds no requirement missing but torch, and `ds --help`, `ds bench --help` and `ds bench --list` run
#    (the CLI imports no torch).
# 2. CPython 3.11 with torch: no torch for cp312 exists on this machine's local indexes, and PyPI's Linux x86_64
#    torch is the CUDA build (its nvidia-* libraries are gigabytes). So the import check runs with the closest torch
#    here, the CPU torch 2.13.0 for cp311 in /opt/wheels (the GPU machine has 2.11), plus the same pins from
#    .whl/carry.txt as cp311 wheels. That is enough for what this script proves: WHICH packages importing the suite
#    needs does not depend on the Python minor version or torch's minor version (torch's own requirements are the
#    same set), and what does depend on 3.12 (wheel tags, markers) step 1 proves. It imports fullchain.cli and every
#    module the suite's benchmarks load (benchmarks/gpu_carry.py --modules) and runs `ds --help` and `ds bench --list`.
#
# Takes a minute or two (two virtualenvs, torch unpacked); not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PY=${PY:-.venv/bin/python}
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}
PY311=${PY311:-/root/.pyenv/versions/3.11.7/bin/python3.11}
TORCH_WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl)}
work=${CHECK_DIR:-/tmp/fc-gpu-carry-check}
[[ -s .whl/carry.txt ]] || { echo "check_gpu_carry: no .whl/carry.txt: run benchmarks/prepare_gpu_carry.sh" >&2; exit 1; }
read -ra benches <<<"$(bash benchmarks/gpu_suite.sh --benches)"
mapfile -t modules < <("$PY" benchmarks/gpu_carry.py "${benches[@]}" --modules)
mapfile -t torch_brings < <("$PY" benchmarks/gpu_carry.py "${benches[@]}" --provided | grep -vx torch)
rm -rf "$work" && mkdir -p "$work"

echo "== 1. CPython 3.12 with exactly the carried wheels ($(wc -l <.whl/carry.txt) of them)"
"$PY312" -m venv "$work/py312"
"$work/py312/bin/python" -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl
# what torch brings on the GPU machine, torch itself excepted (it has no cp312 build here: see above)
"$work/py312/bin/python" -m pip install -q --no-cache-dir -c constraints.txt "${torch_brings[@]}"
missing=$("$work/py312/bin/python" -m pip check | grep -viE "requires torch[ ,]" || true)
if [[ -n $missing && $missing != "No broken requirements found." ]]; then
  echo "check_gpu_carry: carried wheels miss requirements:" >&2; echo "$missing" >&2; exit 1
fi
(cd "$work" && PYTHONPATH=$repo/src "$work/py312/bin/python" -c "import fullchain.cli, sys; assert 'torch' not in sys.modules" \
  && PYTHONPATH=$repo/src "$work/py312/bin/python" -m fullchain.cli --help >/dev/null \
  && PYTHONPATH=$repo/src "$work/py312/bin/python" -m fullchain.cli bench --help >/dev/null \
  && PYTHONPATH=$repo/src "$work/py312/bin/python" -m fullchain.cli bench --list)
echo "ok: every carried wheel installs on cp312 and, with what torch brings, nothing is missing but torch"

echo "== 2. CPython 3.11 with the same pins (cp311 wheels) and $(basename "$TORCH_WHEEL")"
"$PY311" -m venv "$work/py311"
"$work/py311/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$work/cp311" -r .whl/carry.txt
"$work/py311/bin/python" -m pip install -q --no-index --no-deps --no-cache-dir "$work"/cp311/*.whl
# torch with what it requires (and nothing else): resolved from the local indexes at the project's pins
"$work/py311/bin/python" -m pip install -q --no-cache-dir -c constraints.txt "$TORCH_WHEEL"
(cd "$work" && PYTHONPATH=$repo/src "$work/py311/bin/python" - "${modules[@]}" <<'PY'
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    print(f"imported {name}")
PY
PYTHONPATH=$repo/src "$work/py311/bin/python" -m fullchain.cli --help >/dev/null
PYTHONPATH=$repo/src "$work/py311/bin/python" -m fullchain.cli bench --list >/dev/null)
echo "ok: fullchain.cli and the modules of ${benches[*]} import with only the carried packages and torch"
rm -rf "$work"
