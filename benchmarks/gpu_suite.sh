#!/usr/bin/env bash
# Every GPU benchmark in one call, within 8 minutes (../shared/BENCHMARKS.md, docs/benchmarks.md "GPU suite").
#
#   here:        bash benchmarks/prepare_gpu_carry.sh && bash benchmarks/check_gpu_carry.sh
#   GPU machine: bash benchmarks/gpu_suite.sh            (device call: carry [".whl"], timeout_s 560)
#   either:      bash benchmarks/gpu_suite.sh --benches  (the benchmarks it runs; the carry list is derived from them)
#
# After the benchmarks, one case that is not a `ds bench` (`ds bench parallel`'s parts are gloo collectives on the
# CPU): placed training, `ds train`'s `distributed.placement.enabled` wiring on CUDA (placement.json).
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

# Placed training (issue 16): the Trainer as `ds train` builds it with distributed.placement.enabled
# (`place_for_training`) on a recommender whose 2M-row table (256 MB) stays in host memory with SparseAdam while the
# MLP trains on the GPU, beside the same model wholly on the GPU with AdamW; then placed with fp16 loss scaling over
# the CPU table's sparse gradients. Imports only what the carry already holds (torch, pydantic, numpy, rich, yaml).
limit=$((TOTAL_S - SECONDS)); ((limit > 60)) && limit=60
if ((limit < 10)); then echo "!! placement not run: the suite's 8 minutes are spent"; else
  echo "== placed training on cuda (limit ${limit}s, ${SECONDS}s into the suite)"
  timeout --kill-after=5 "$limit" python3 - "$out/placement.json" <<'PY' || echo "!! placement failed or ran out of time"
import json, statistics, sys, time
import torch
from fullchain.bench.parallel import Recommender
from fullchain.config import validate_config
from fullchain.distributed.placement import MB, place_for_training
from fullchain.train.trainer import Trainer

ROWS, DIM, BATCH, STEPS = 2_000_000, 32, 1024, 40
device = torch.device("cuda")
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, ROWS, (BATCH * STEPS, 4), generator=g)
data = torch.utils.data.TensorDataset(torch.cat([ids.float(), torch.randn(BATCH * STEPS, 8, generator=g)], 1),
                                      ids[:, 0] % 2)
# place_for_training reads distributed.placement and train.optimizer; data and model only complete the schema
cfg = validate_config({"name": "placement", "data": {"name": "digits"}, "model": {"name": "mlp"},
                       "train": {"optimizer": {"lr": 1e-3}}, "distributed": {"placement": {"enabled": True}}})


class StepTimes:
    def __init__(self):
        self.times, self.last = [], None

    def on_step_end(self, trainer, metrics):
        torch.cuda.synchronize()
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def contender(placed: bool, precision: str) -> dict:
    torch.manual_seed(0)
    model = Recommender(12, 2, rows=ROWS, dim=DIM, sparse=False)
    kwargs = {}
    if placed:
        _, optimizer, kwargs["strategy"] = place_for_training(
            model, cfg, device, lambda params: torch.optim.AdamW(params, lr=1e-3))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.cuda.reset_peak_memory_stats()
    times = StepTimes()
    result = Trainer(model, optimizer, data, config={"max_steps": STEPS, "batch_size": BATCH, "progress": False,
                                                     "tensorboard": False, "device": "cuda", "precision": precision},
                     callbacks=[times], **kwargs).fit()
    return {"step_s": statistics.median(times.times[3:]), "gpu_peak_mb": torch.cuda.max_memory_allocated() / MB,
            "table_device": model.table.weight.device.type, "final_loss": result.final_loss,
            "amp_skipped_steps": result.skipped_steps}


results = {"one_device_dense": contender(False, "fp32"), "placed": contender(True, "fp32"),
           "placed_fp16": contender(True, "fp16")}
dense, placed, fp16 = results["one_device_dense"], results["placed"], results["placed_fp16"]
table_mb = ROWS * DIM * 4 / MB
record = {
    "bench": "placement", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
    "settings": {"rows": ROWS, "dim": DIM, "batch": BATCH, "steps": STEPS, "optimizer": "AdamW + SparseAdam"},
    "results": results,
    "ratios": {"placed_vs_dense_step_time": placed["step_s"] / dense["step_s"],
               "placed_vs_dense_gpu_peak_memory": placed["gpu_peak_mb"] / dense["gpu_peak_mb"]},
    "checks": {"placed_table_in_host_memory": placed["table_device"] == "cpu" and placed["gpu_peak_mb"] < table_mb,
               "placed_fp16_trained": fp16["final_loss"] == fp16["final_loss"] and fp16["amp_skipped_steps"] < STEPS},
    "notes": [f"table {table_mb:.0f} MB; step times are medians after 3 warm-up steps"],
}
open(sys.argv[1], "w").write(json.dumps(record, indent=2))
print(json.dumps(record["results"], indent=1))
PY
fi

python3 - "$out" "${BENCHES[@]}" placement <<'PY' | tee "$out/summary.txt"
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
