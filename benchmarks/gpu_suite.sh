#!/usr/bin/env bash
# Every GPU benchmark in one call, within 8 minutes (../shared/BENCHMARKS.md).
# The GPU machine has PyTorch but no internet: run benchmarks/prepare_gpu_carry.sh here first, then carry
# .whl (fullchain's pure-Python dependencies) and .data (Fashion-MNIST) with the call.
# JSON records go to $OUT (or benchmarks/out); a summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fc-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/fc-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
[ -d .data/fashion-mnist ] && export FULLCHAIN_FASHION_MNIST_DIR=$PWD/.data/fashion-mnist
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

run() {  # run NAME SECONDS: one benchmark, bounded so the suite always reaches its summary
  local name=$1 limit=$2
  echo "== ds bench $name --device cuda (limit ${limit}s)"
  timeout "$limit" python3 -m fullchain.cli bench "$name" --device cuda --json "$out/$name.json" || echo "!! $name failed or timed out"
}

run amp 260
run fusion 200   # fp16 on GPU: eager, passes, passes+compile, compile; the claim is +37 % speed, -28 % memory

python3 - "$out" <<'PY'
import json, pathlib, sys
print("\n== GPU suite summary")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    rec = json.loads(path.read_text())
    print(f"{rec['bench']:18s} {rec['device']}")
    for k, v in rec["ratios"].items():
        print(f"    ratio {k:34s} {v:.4f}")
    for k, v in rec["checks"].items():
        print(f"    check {k:34s} {v}")
PY
