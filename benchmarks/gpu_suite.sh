#!/usr/bin/env bash
# Every GPU benchmark in one call, within 8 minutes (../shared/BENCHMARKS.md, docs/benchmarks.md "GPU suite").
#
#   here:        bash benchmarks/prepare_gpu_carry.sh && bash benchmarks/check_gpu_carry.sh
#   GPU machine: bash benchmarks/gpu_suite.sh            (device call: carry [".whl"], timeout_s 560)
#   either:      bash benchmarks/gpu_suite.sh --benches  (the benchmarks it runs; the carry list is derived from them)
#
# The GPU machine has Python 3.12 and PyTorch but no internet: the wheels in .whl/ (prepare_gpu_carry.sh) are
# installed into /tmp/fc-site ahead of the machine's own packages. Each case is bounded by `timeout` and by what is
# left of the 8 minutes, and writes its JSON record under $OUT (or benchmarks/out) as soon as it ends, so a case
# that runs out of time still leaves the earlier records. A summary table is printed last (and kept as summary.txt).
set -uo pipefail
BENCHES=(amp gpu-inference serve fusion)
if [[ ${1:-} == --benches ]]; then echo "${BENCHES[@]}"; exit 0; fi

cd "$(dirname "$0")/.."
TOTAL_S=470  # 8 minutes, less the margin the summary needs
out=${OUT:-benchmarks/out}
mkdir -p "$out"
exec > >(tee "$out/suite.log") 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fc-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/fc-site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "!! no .whl/*.whl: run benchmarks/prepare_gpu_carry.sh here and carry .whl"
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

case_limit() {  # case_limit NAME: seconds one case may take
  case $1 in
    amp) echo 100 ;;            # ResNet-50 at 224 px and a BERT-base-sized Transformer, fp32 / bf16 / fp16
    gpu-inference) echo 45 ;;   # fp32 / fp16 eager, ONNX Runtime CUDA fp32 / fp16 / int8, TensorRT, where installed
    serve) echo 100 ;;          # ds serve against a plain FastAPI endpoint and LitServe
    fusion) echo 190 ;;         # fp16: eager, passes, passes+compile, compile (the +37 % speed / -28 % memory claim)
  esac
}

for name in "${BENCHES[@]}"; do
  left=$((TOTAL_S - SECONDS))
  limit=$(case_limit "$name")
  ((limit > left)) && limit=$left
  if ((limit < 10)); then echo "!! $name not run: the suite's 8 minutes are spent"; continue; fi
  echo "== ds bench $name --device cuda (limit ${limit}s, ${SECONDS}s into the suite)"
  timeout --kill-after=5 "$limit" python3 -m fullchain.cli bench "$name" --device cuda --json "$out/$name.json"
  code=$?
  ((code == 124 || code == 137)) && echo "!! $name ran out of its ${limit}s" || ((code == 0)) || echo "!! $name failed (exit $code)"
done

python3 - "$out" "${BENCHES[@]}" <<'PY' | tee "$out/summary.txt"
import json, pathlib, sys
out, benches = pathlib.Path(sys.argv[1]), sys.argv[2:]
print("\n== GPU suite summary")
for name in benches:
    path = out / f"{name}.json"
    if not path.exists():
        print(f"{name:16s} no record (failed or out of time: see suite.log)")
        continue
    rec = json.loads(path.read_text())
    print(f"{name:16s} {rec['device']}  torch {rec['torch']}")
    for k, v in rec["ratios"].items():
        print(f"    ratio {k:52s} {v:.4f}" if isinstance(v, (int, float)) else f"    ratio {k:52s} {v}")
    for k, v in rec["checks"].items():
        print(f"    check {k:52s} {v}")
    for note in rec.get("notes", []):
        print(f"    note  {note}")
PY
