#!/usr/bin/env bash
# Device call 3: correctness of the prefetching kernel + gated + dispatch, then ncu times.
set -o pipefail
export PYTHONUNBUFFERED=1
timeout 75 python3 -m pytest -q -x -m gpu tests/test_kernels_gpu.py -k "tilings or gated or dispatch or (bits_dtypes and (4- or 3-))" 2>&1 | tail -15 | tee "$OUT/pytest_gpu3.log"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 90 "$NCU" --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
   python3 benchmarks/ncu_probe.py > "$OUT/ncu.csv" 2> "$OUT/ncu.err"; echo "ncu rc=$?"
python3 benchmarks/ncu_probe.py --parse "$OUT/ncu.csv" | grep -E "marlin|qmv|gemv|nvjet|gemm" | tee "$OUT/ncu_summary.txt"
