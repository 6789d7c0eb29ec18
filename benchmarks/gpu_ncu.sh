#!/usr/bin/env bash
# Kernel-only GPU times through Nsight Compute (no host overhead): our qmv variants, MLX's
# quantized_matmul and the fp16 matmul, plus the gated-MLP and dequantize kernels.
# On the GPU machine, after `source .gpu/b/stage2`:  bash benchmarks/gpu_ncu.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 150 "$NCU" --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
   python3 benchmarks/ncu_probe.py > "$OUT/ncu.csv" 2> "$OUT/ncu.err"; echo "ncu rc=$?"
python3 benchmarks/ncu_probe.py --parse "$OUT/ncu.csv" | grep -E "marlin|qmv|gemv|nvjet|gemm" | tee "$OUT/ncu_summary.txt"
