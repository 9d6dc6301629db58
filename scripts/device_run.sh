#!/usr/bin/env bash
# One batched GPU session (used with the lent H100): build for sm_90a, run the CUDA tests, run the
# kernel benchmarks. Everything lands in $OUT (or ./device_out): session.log + bench_*.{md,json}.
#   bash scripts/device_run.sh [tests|bench|all] [pytest -k expr] [bench names: routing,esi,grouped,generate]
set -uo pipefail
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
what=${1:-all}
kexpr=${2:-cuda or CUDA}
benches=${3:-routing,esi,grouped}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
t0=$(date +%s)
say() { echo "$*" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$LOG"
if ! python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1; then
  tail -60 /tmp/build.log | tee -a "$LOG"; exit 1
fi
say "build: $(( $(date +%s) - t0 )) s"
python3 -m upsafe_ext.info >> "$LOG" 2>&1
if [ "$what" = tests ] || [ "$what" = all ]; then
  files=$(ls python_tests/test_routing.py python_tests/test_grouped_mlp.py python_tests/test_esi_ops.py \
    python_tests/test_safety_moe.py 2>/dev/null)
  timeout 240 python3 -m pytest $files -v -k "$kexpr" -p no:cacheprovider >> "$LOG" 2>&1
  say "pytest exit $? after $(( $(date +%s) - t0 )) s"
  grep -E "PASSED|FAILED|ERROR|SKIPPED|Fatal|Segmentation|^E " "$LOG" | grep -v "^.*PASSED" | head -40
  grep -c PASSED "$LOG" | sed 's/^/passed: /'
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for b in ${benches//,/ }; do
    case $b in
      routing) timeout 90 python3 benchmarks/bench_routing.py --out "$OUT" >> "$LOG" 2>&1; tail -8 "$OUT/bench_routing.md" ;;
      profile) timeout 60 python3 benchmarks/bench_routing.py --profile --out "$OUT" >> "$LOG" 2>&1; cat "$OUT/profile_routing.md" ;;
      esi) timeout 150 python3 benchmarks/bench_esi.py --out "$OUT" >> "$LOG" 2>&1; tail -3 "$OUT/bench_esi.md" ;;
      grouped) timeout 240 python3 benchmarks/bench_grouped_mlp.py --out "$OUT" >> "$LOG" 2>&1; tail -13 "$OUT/bench_grouped_mlp.md" ;;
      layer) timeout 120 python3 benchmarks/bench_generate.py --profile-layer --out "$OUT" >> "$LOG" 2>&1; head -40 "$OUT/profile_layer.txt" ;;
      generate) timeout 240 python3 benchmarks/bench_generate.py --out "$OUT" >> "$LOG" 2>&1; tail -8 "$OUT/bench_generate.md" ;;
    esac
    say "bench $b done: $(( $(date +%s) - t0 )) s"
  done
fi
say "total: $(( $(date +%s) - t0 )) s"
