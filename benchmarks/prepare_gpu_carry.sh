#!/usr/bin/env bash
# Prepares .whl/ for benchmarks/gpu_suite.sh on the offline GPU machine (CPython 3.12, Linux x86_64, PyTorch
# preinstalled): the wheels of exactly the packages the suite's benchmarks import, with what they require, at the
# versions constraints.txt pins, less torch and what torch requires (benchmarks/gpu_carry.py derives the list).
# .whl/carry.txt keeps the list. The device call names .whl in `carry`; everything that travels (the working tree
# and .whl) must stay within 64 MiB, which this script checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUDGET_MIB=64

read -ra benches <<<"$(bash benchmarks/gpu_suite.sh --benches)"
list=$("$PY" benchmarks/gpu_carry.py "${benches[@]}")
rm -rf .whl && mkdir -p .whl
echo "$list" >.whl/carry.txt
# pip matches manylinux tags exactly: name every tag a pinned wheel may carry
platforms=()
for tag in manylinux1 manylinux2010 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_26 manylinux_2_27 manylinux_2_28 \
           manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${tag}_x86_64")
done
# shellcheck disable=SC2086 # one requirement a word
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none "${platforms[@]}" -d .whl $list

wheels=$(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l)
count=$(wc -l <.whl/carry.txt)
[[ $wheels == "$count" ]] || { echo "prepare_gpu_carry: $count pins but $wheels wheels in .whl" >&2; exit 1; }
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
carry=$(du -cb .whl | tail -1 | cut -f1)
total_mib=$(((tree + carry) / 1048576))
printf 'carry: %d wheels, %.1f MiB; working tree %.1f MiB; together %d of %d MiB\n' "$wheels" \
  "$(echo "$carry / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" "$total_mib" "$BUDGET_MIB"
((total_mib < BUDGET_MIB)) || { echo "prepare_gpu_carry: over the device call's $BUDGET_MIB MiB" >&2; exit 1; }
