#!/usr/bin/env bash
# One device call: GPU kernel tests, then the kernel benchmark. Usage (on the GPU machine,
# after `source .gpu/b/stage2`): bash benchmarks/gpu_run.sh [quick|full] [extra benchmark args]
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mode=${1:-quick}; shift || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv,noheader
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -m gpu tests/test_kernels_gpu.py 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log"
fi
if [ "$mode" = quick ]; then
  python3 benchmarks/kernels.py --quick --out "$OUT/kernels_h200.json" "$@" 2>&1 | tee "$OUT/bench.log"
else
  python3 benchmarks/kernels.py --out "$OUT/kernels_h200.json" "$@" 2>&1 | tee "$OUT/bench.log"
fi
