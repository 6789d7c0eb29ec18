#!/usr/bin/env bash
# The MoE models end to end on the GPU: GLM-4.7-Flash- and Qwen3-30B-A3B-shaped checkpoints with
# random 4-bit weights (affine, group 64), marlin-mlx vs mlx-lm in the same run through
# `marlin-mlx bench --random-weights ... --compare mlx-lm`: prefill of a 2048-token prompt, decode
# at short context (128-token prompt) and after an 8k prompt, batch 1. Each random checkpoint
# lives in a scratch folder that is deleted after its model (also when a run is cut short).
#
# Usage (GPU machine, after `source .gpu/b/stage2`): bash benchmarks/gpu_moe.sh
# Writes $OUT/moe_<model>.json (marlin-mlx bench's JSON) and $OUT/gpu_moe.log.
# Sized to end well inside 9 minutes on the H200: a model that would start with less than
# MOE_MIN_S seconds of MOE_BUDGET_S left is skipped, a running one is stopped at the budget.
# Environment (defaults): MOE_MODELS ("glm-4.7-flash qwen3-30b-a3b": presets or config.json
# paths), MOE_PROMPTS (128,2048,8192), MOE_GEN (32 decode steps), MOE_TRIALS (1, after 1
# warm-up), MOE_BUDGET_S (500), MOE_MIN_S (150), MOE_DTYPE (unset: the checkpoint's bfloat16).
# Seen on the H200 (2026-11-26): GLM-4.7-Flash's random checkpoint (16.85 GB) took well over
# 100 s to build and load, and the first trial (kernel compiles, first-use selections) did not
# finish inside 161 s with prompts 128,2048: GLM alone may need most of the budget, so it runs
# first and the second model is skipped when less than MOE_MIN_S is left.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MARLIN_MLX_CACHE_DIR=${MARLIN_MLX_CACHE_DIR:-/tmp/mmc}
MODELS=${MOE_MODELS:-"glm-4.7-flash qwen3-30b-a3b"}
PROMPTS=${MOE_PROMPTS:-128,2048,8192}
GEN=${MOE_GEN:-32}
TRIALS=${MOE_TRIALS:-1}
BUDGET=${MOE_BUDGET_S:-500}
MIN_S=${MOE_MIN_S:-150}
PY=${PYTHON:-python3}
LOG="$OUT/gpu_moe.log"

scratch=$(mktemp -d "${MOE_SCRATCH:-/tmp}/moe-ckpt.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used --format=csv,noheader | tee -a "$LOG"
df -h "$scratch" | tail -1 | tee -a "$LOG"
start=$SECONDS
for m in $MODELS; do
  name=$(basename "$m" .json)
  left=$(( BUDGET - (SECONDS - start) ))
  if (( left < MIN_S )); then
    echo "== $name: skipped, $left s of the budget left" | tee -a "$LOG"
    continue
  fi
  echo "== $name (budget left $left s)" | tee -a "$LOG"
  # the random checkpoint goes to mkdtemp under $TMPDIR: the scratch folder
  TMPDIR="$scratch" timeout -k 10 "$left" "$PY" -m marlin_mlx.cli bench --random-weights "$m" \
    --bits 4 --group-size 64 --prompt-tokens "$PROMPTS" --gen-tokens "$GEN" --trials "$TRIALS" \
    --warmup 1 --compare mlx-lm ${MOE_DTYPE:+--dtype "$MOE_DTYPE"} --json "$OUT/moe_${name}.json" 2>&1 | tee -a "$LOG"
  echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$LOG"
  rm -rf "${scratch:?}"/*
done
echo "== done in $((SECONDS - start)) s" | tee -a "$LOG"
