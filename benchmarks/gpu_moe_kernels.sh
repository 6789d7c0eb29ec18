#!/usr/bin/env bash
# One device call for the MoE kernels: their GPU tests, then one MoE layer's decode step timed
# against the previous path (benchmarks/moe_layer.py, with the expert kernels' tiling sweep),
# then, with time left, a short end-to-end check of benchmarks/gpu_moe.sh (GLM-4.7-Flash only).
# Usage (GPU machine, after `source .gpu/b/stage2`): bash benchmarks/gpu_moe_kernels.sh
# Writes $OUT/moe_tests.txt, $OUT/moe_layer.json/.txt and gpu_moe.sh's files.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MARLIN_MLX_CACHE_DIR=${MARLIN_MLX_CACHE_DIR:-/tmp/mmc}
TOTAL=${MOE_ROUND_S:-540}
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
timeout -k 5 "${MOE_TEST_S:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider -rf \
  tests/test_moe_kernels.py 2>&1 | tail -60 > "$OUT/moe_tests.txt"
tail -25 "$OUT/moe_tests.txt"
echo "== tests done after $((SECONDS - start)) s"
timeout -k 5 "${MOE_LAYER_S:-200}" python3 benchmarks/moe_layer.py --sweep --json "$OUT/moe_layer.json" \
  2>&1 | tee "$OUT/moe_layer.txt"
echo "== layer timing done after $((SECONDS - start)) s"
left=$(( TOTAL - (SECONDS - start) ))
MOE_MODELS=glm-4.7-flash MOE_PROMPTS=128,2048 MOE_GEN=16 MOE_TRIALS=1 MOE_BUDGET_S=$left MOE_MIN_S=90 \
  bash benchmarks/gpu_moe.sh
echo "== round done after $((SECONDS - start)) s"
