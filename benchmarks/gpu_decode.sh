#!/usr/bin/env bash
# Batch-1 decode of a Qwen3-8B-shaped 4-bit model: the compiled decode step on and off, against
# mlx-lm, plus where a step's host and GPU time go. One device call (< 5 min on an H200), after
# `source .gpu/b/stage2 && export MARLIN_MLX_CACHE_DIR=/tmp/mmc`:
#   bash benchmarks/gpu_decode.sh            (JSON and logs under $OUT)
# QUICK=1: fewer steps and one bench prompt length (a smoke run of the same steps).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CKPT=/tmp/qwen3-8b-4bit-random
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
if [ "${QUICK:-0}" = 1 ]; then P=128; GEN=64; TRIALS=2; PSTEPS=32; else P=128,2048; GEN=128; TRIALS=3; PSTEPS=64; fi

# 1. correctness on this GPU: the compiled step (custom kernels inside mx.compile), the decode
#    fusions (kernels.fused_linear, kernels.qk_rope) and the GEMV kernels they extend
timeout 150 python3 -m pytest -q -x tests/test_compiled_decode.py tests/test_fused_decode.py \
  tests/test_kernels_gpu.py -k "4bit or failed or fused or rope or qmv or gated" \
  2>&1 | tail -5 | tee "$OUT/pytest_compiled.log"

# 2. host time per step (graph build), graph nodes, tok/s: plain -> fused q/k/v -> compiled;
#    GPU kernel time per category (CUPTI) for the plain and the compiled step
timeout 200 python3 benchmarks/decode_probe.py --preset qwen3-8b --variants auto \
  --compile-modes plain,qkv,compiled --profile auto+compiled --steps "$PSTEPS" \
  --json "$OUT/decode_probe_compiled.json" 2>&1 | grep -v "^ *[0-9.]* µs x" | tee "$OUT/probe.log"

# 3. the bench, compiled step on, against mlx-lm
timeout 240 marlin-mlx bench --random-weights qwen3-8b --bits 4 --group-size 64 \
  --prompt-tokens "$P" --gen-tokens "$GEN" --trials "$TRIALS" --compare mlx-lm --quiet \
  --save-random "$CKPT" --json "$OUT/bench_compiled.json" 2>&1 | tail -25 | tee "$OUT/bench_compiled.log"
# 3b. the same with the decode fusions off (norm / residual / q-k-norm-RoPE: session 6)
MARLIN_MLX_FUSE_DECODE=0 timeout 120 marlin-mlx bench --model "$CKPT" --prompt-tokens "$P" \
  --gen-tokens "$GEN" --trials "$TRIALS" --quiet --json "$OUT/bench_nofusion.json" 2>&1 \
  | grep -E "decode tok|prefill tok|batch" | tee "$OUT/bench_nofusion.log"
# 4. our kernels forced on every shape (the first-use selection is timed wall-clock and picked
#    MLX's qmv for the fused q/k/v and the down projection in session 2), compiled step on
MARLIN_MLX_KERNELS=custom timeout 60 marlin-mlx bench --model "$CKPT" --prompt-tokens "$P" \
  --gen-tokens "$GEN" --trials "$TRIALS" --quiet --json "$OUT/bench_custom_compiled.json" 2>&1 \
  | grep -E "decode tok|prefill tok|batch" | tee "$OUT/bench_custom_compiled.log"
rm -rf "$CKPT"
