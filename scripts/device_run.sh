#!/usr/bin/env bash
# One batched GPU session (used with the lent H100): build for sm_90a, run the CUDA tests, run the
# kernel benchmarks, leave logs + JSON/markdown under $OUT (or ./device_out). Usage:
#   bash scripts/device_run.sh [tests|bench|all] [extra pytest -k expr]
set -uo pipefail
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
what=${1:-all}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -m upsafe_ext.info | tee "$OUT/info.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 300 python3 -m pytest python_tests/test_routing.py python_tests/test_grouped_mlp.py python_tests/test_esi_ops.py \
    -q -x -k "${2:-cuda or CUDA}" -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/tests.txt"
  echo "tests done: $(( $(date +%s) - t0 )) s"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 120 python3 benchmarks/bench_routing.py --out "$OUT" > "$OUT/bench_routing.log" 2>&1; tail -9 "$OUT/bench_routing.log"
  timeout 200 python3 benchmarks/bench_esi.py --out "$OUT" > "$OUT/bench_esi.log" 2>&1; tail -5 "$OUT/bench_esi.log"
  timeout 300 python3 benchmarks/bench_grouped_mlp.py --out "$OUT" > "$OUT/bench_grouped_mlp.log" 2>&1; tail -16 "$OUT/bench_grouped_mlp.log"
fi
echo "total: $(( $(date +%s) - t0 )) s"
