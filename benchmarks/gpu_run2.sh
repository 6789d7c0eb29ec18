#!/usr/bin/env bash
# Device call 2: new GPU tests, kernel-only times via ncu, then a short wall-clock benchmark.
set -o pipefail
export PYTHONUNBUFFERED=1
timeout 60 python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -k "dequantize or dispatch or gated" 2>&1 | tail -30 | tee "$OUT/pytest_gpu2.log"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
if [ -n "$NCU" ]; then
  timeout 75 "$NCU" --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
     python3 benchmarks/ncu_probe.py > "$OUT/ncu.csv" 2> "$OUT/ncu.err"; echo "ncu rc=$?"
  tail -3 "$OUT/ncu.err"
  python3 benchmarks/ncu_probe.py --parse "$OUT/ncu.csv" | tee "$OUT/ncu_summary.txt"
fi
timeout 45 python3 benchmarks/kernels.py --out "$OUT/kernels_h200.json" "$@" 2>&1 | tee "$OUT/bench.log"
