#!/usr/bin/env bash
# One device call for the whole-model measurement (issue #4 goal, issue #5 bench), on the GPU
# machine after `source .gpu/b/stage2`:
#   bash benchmarks/gpu_round.sh [probe] [bench] [tests] [kernels]   (default: probe bench)
# probe:   benchmarks/decode_probe.py on Qwen3-8B shapes (4-bit g64): decode tok/s per kernel
#          path / fusion variant, host vs GPU time per step, GPU time per kernel category (CUPTI)
# bench:   marlin-mlx bench vs mlx-lm in the same run (prompts 128 and 2048, 64 decode tokens)
# tests:   the GPU kernel tests
# kernels: the kernel matrix (benchmarks/kernels.py)
# alltests: every GPU test of the suite (pytest -m gpu tests/)
# serving: benchmarks/serving.py on a random Qwen3-8B-shaped 4-bit checkpoint, 32 clients
# qmmtests:   the tensor-core qmm kernel's GPU tests
# qmmkernels: the kernel matrix for affine 4-bit, M 1-64, bfloat16 x, with qmm launch variants
# engine:     benchmarks/engine_probe.py (serving engine step by batch size), qmm on and off
# moe:     benchmarks/gpu_moe.sh (GLM-4.7-Flash and Qwen3-30B-A3B shapes vs mlx-lm)
# fusedtests: the decode fusions' GPU tests, the compiled step's, and the paged-attention GPU
#          tests with at most 2 query heads per threadgroup (MARLIN_MLX_PAGED_HEADS=2)
# glmheads: GLM-4.7-Flash batch-1 decode through the compiled step (decode_probe --compiled),
#          prompts GLM_PROMPTS (128 8192), paged-attention heads per threadgroup as the
#          variants (GLM_VARIANTS: auto,auto-h4,auto-h2)
# mla:     the MLA decode fusions' GPU tests (and the other decode-fusion tests), then
#          GLM-4.7-Flash batch-1 decode, fusions on and off (GLM_VARIANTS: auto,auto-nofd),
#          CUPTI profile of the fused step (GLM_PROFILE: auto), prompts GLM_PROMPTS (128)
# hostcost: benchmarks/host_cost.py (wall µs per graph node of builtin vs custom ops), the GLM
#          fused decode test with its traceback, GLM decode fusions on/off at the default and at
#          MLX_MAX_OPS_PER_BUFFER=GLM_SWEEP (1000)
# mlamoe:  session 8's kernels: the GPU tests of the MLA first pass (paged attention), the fused
#          norm + router and the down + residual kernels; benchmarks/mla_attention.py at the
#          default heads cap (4) and at 10; GLM-4.7-Flash decode fusions on/off with the CUPTI
#          profile of the fused step (prompt GLM_PROMPTS, 128)
# whole:   session 9: the compiled whole decode step over the latent cache: GPU tests of the MLA
#          decode kernels and the compiled steps, then GLM-4.7-Flash decode whole step vs the
#          per-layer split, and the whole step with MLX's CUDA graphs off (MLX_USE_CUDA_GRAPHS=0)
# moeprefill: the MoE prefill variants' GPU tests, then benchmarks/moe_layer.py --prefill-variants
#          (every variant of kernels/moe_experts.py at 2048 tokens, GLM and Qwen3-30B-A3B shapes)
# blockqmm: the block_qmm GPU tests (and the quant_blocks prefill variant's), then
#          benchmarks/block_qmm.py (launch shapes against dequantize + gather_mm, GLM experts)
# prefill: benchmarks/prefill_probe.py on GLM-4.7-Flash shapes (2048 tokens): TTFT per MoE prefill
#          variant (PREFILL_VARIANTS) and the GPU time per kernel of each (CUPTI)
# qmvsweep: Nsight Compute kernel times of every qmv / gated-MLP launch shape (R, SK, PF) on
#          Qwen3-8B's decode GEMVs (benchmarks/ncu_probe.py --sweep)
# stream:  Nsight Compute: a plain read kernel over the bytes of each decode GEMV (loads in
#          flight, blocks per SM) beside qmv / MLX / fp16 on the shape (benchmarks/stream_probe.py),
#          then the full sections of one launch each of qmv, qmm, fp16 and the stream kernel
# patterns: Nsight Compute: a GEMV's weight bytes read in qmv's and qmv_tc's orders with no
#          arithmetic, beside the plain stream (benchmarks/stream_probe.py --patterns)
# pipe:    qmv_tc's asynchronous-copy loop: its GPU tests, then Nsight Compute times over
#          (PIPE, SK, U) beside the float body and the register-prefetch loop
# tc:      qmv's tensor-core body: its GPU tests (and the kernel tests, which now take it), then
#          Nsight Compute times of both bodies and every tensor-core (RT, SK) per decode shape
# fold:    qmv's folded tensor-core body: its GPU tests, then Nsight Compute times of every
#          (RT, SK) beside the float body, qmv_tc, MLX and the plain read (stream_probe.py --fold),
#          then the sections of one launch each (--details; DETAILS=0 skips)
# rows:    the folded GEMV at 2-16 rows (batched decode): its GPU tests and the fused variants,
#          then Nsight Compute times at M = 1-16 on the issue's five shapes beside qmm, MLX and
#          the 16-bit matmul (stream_probe.py --rows, ncu_probe.py --parse-marked), then the
#          serving engine's compiled decode step at batch 1-16 with the folded body on and off
# pieces:  the folded GEMV's 16-byte pieces at one row (P16): the fold GPU tests with them on,
#          the fused variants' too (MARLIN_MLX_QMV_FOLD_P16=1), then Nsight Compute
#          times against the per-group reads (stream_probe.py --pieces, ncu_probe.py --parse-marked)
# flash:   the flash_prefill and dequantize GPU tests (FLASH_TESTS: more test files), then benchmarks/flash_attention.py (our
#          large-head prefill attention vs MLX's, GLM-4.7-Flash shapes)
# large:   large_qmm (4-bit product for many rows on warpgroup tensor cores): its GPU tests, then
#          benchmarks/large_qmm.py (against dequantize + matmul and the 16-bit matmul;
#          LARGE_MS, LARGE_SHAPES, LARGE_TILINGS)
# kvdecode: a Llama/Qwen3 KVCache attending through the buffer kernel, so the decode step
#          compiles whole: its GPU tests (buffer kernel, in-place rope write, whole step), then
#          decode_probe --compiled on KV_PRESETS (qwen3-8b) at KV_PROMPTS (128 2048), SDPA per
#          layer against the buffer kernel, alternating (KV_VARIANTS), with a CUPTI profile of
#          each (KV_PROFILE)
# bufattn: benchmarks/buffer_attention.py (the buffer kernel's tilings against MLX's SDPA and
#          the paged kernel over whole buffers, contexts BUF_CTX)
# PROBE_VARIANTS / PROBE_PROFILE override the probe's variant lists.
set -o pipefail
export PYTHONUNBUFFERED=1
export MARLIN_MLX_CACHE_DIR=${MARLIN_MLX_CACHE_DIR:-/tmp/mmc}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
parts=${*:-probe bench}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv,noheader
for part in $parts; do
  t0=$(date +%s)
  case $part in
    probe)
      timeout ${PROBE_TIMEOUT:-170} python3 benchmarks/decode_probe.py --preset qwen3-8b --bits 4 \
        --group-size 64 --prompt 128 --steps 64 \
        --variants "${PROBE_VARIANTS:-builtin,custom-nobake,custom-nofuse,custom,auto,custom-pf1,custom-qkv}" \
        --buffer-sweep "${PROBE_SWEEP:-100}" --sweep-variants "${PROBE_SWEEP_VARIANTS:-custom}" \
        --profile "${PROBE_PROFILE:-custom}" --json "$OUT/decode_probe_qwen3-8b.json" 2>&1 \
        | grep --line-buffered -v "^\s*$" | tee "$OUT/probe.log" ;;
    bench)
      timeout ${BENCH_TIMEOUT:-170} marlin-mlx bench --random-weights qwen3-8b --bits 4 --group-size 64 \
        --prompt-tokens 128,2048 --gen-tokens 64 --trials 3 --compare mlx-lm --save-random /tmp/q8 \
        --json "$OUT/gpu_qwen3-8b_4bit.json" -q 2>&1 | tee "$OUT/bench.log" ;;
    bench2)
      # marlin-mlx alone on the saved checkpoint with the knobs the probe measured faster
      knobs=$(python3 - "$OUT/decode_probe_qwen3-8b.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception:
    print(""); sys.exit()
v = r.get("variants", {})
base = v.get("custom", {}).get("decode_tps", 0)
env = []
if v.get("custom-pf1", {}).get("decode_tps", 0) > 1.02 * base:
    env.append("MARLIN_MLX_QMV_PF=1")
ob = r.get("ops_per_buffer", {}).get("100", {}).get("custom", 0)
if ob > 1.02 * base:
    env.append("MLX_MAX_OPS_PER_BUFFER=100")
print(" ".join(env))
PY
)
      echo "bench2 knobs: ${knobs:-none}"
      [ -d /tmp/q8 ] && env $knobs timeout ${BENCH2_TIMEOUT:-100} marlin-mlx bench -m /tmp/q8 \
        --prompt-tokens 128,2048 --gen-tokens 64 --trials 3 \
        --json "$OUT/gpu_qwen3-8b_4bit_tuned.json" -q 2>&1 | tee "$OUT/bench2.log" ;;
    tests)
      timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -m gpu tests/test_kernels_gpu.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
        | tail -30 | tee "$OUT/pytest_gpu.log" ;;
    kernels)
      timeout ${KERNELS_TIMEOUT:-240} python3 benchmarks/kernels.py --out "$OUT/kernels_h200.json" 2>&1 \
        | tail -80 | tee "$OUT/kernels.log" ;;
    alltests)
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 \
        | tail -40 | tee "$OUT/pytest_gpu_all.log" ;;
    serving)
      timeout ${SERVING_TIMEOUT:-420} python3 benchmarks/serving.py --random-weights qwen3-8b \
        --save-random /tmp/q8s --clients ${SERVING_CLIENTS:-32} --duration ${SERVING_DURATION:-30} \
        --drain-timeout 60 --out "$OUT/serving_qwen3-8b-4bit_h200.json" 2>&1 \
        | tail -40 | tee "$OUT/serving.log" ;;
    qmmtests)
      timeout ${TESTS_TIMEOUT:-170} python3 -m pytest -q -m gpu tests/test_qmm.py -p no:cacheprovider 2>&1 \
        | tail -30 | tee "$OUT/pytest_qmm.log" ;;
    qmmkernels)
      timeout ${KERNELS_TIMEOUT:-240} python3 benchmarks/kernels.py --formats affine-4 --dtype bfloat16 \
        --ms ${KERNEL_MS:-1,2,4,8,16,32,64} --qmm-variants "${QMM_VARIANTS:-auto;NT2;NT1;NT4SK4}" \
        --out "$OUT/kernels_qmm_h200.json" 2>&1 | tail -80 | tee "$OUT/kernels_qmm.log" ;;
    engine)
      for qmin in ${ENGINE_QMM_MIN:-2 999}; do
        MARLIN_MLX_QMM_MIN_M=$qmin timeout ${ENGINE_TIMEOUT:-100} python3 benchmarks/engine_probe.py \
          --preset qwen3-8b --batch ${ENGINE_BATCH:-1,4,8,16,32} \
          --json "$OUT/engine_probe_qwen3-8b_qmm$qmin.json" 2>&1 | tail -20 | tee -a "$OUT/engine.log"
      done ;;
    moe)
      timeout ${MOE_TIMEOUT:-540} bash benchmarks/gpu_moe.sh 2>&1 | tail -60 | tee "$OUT/moe.log" ;;
    fusedtests)
      timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q --tb=short -p no:cacheprovider \
        tests/test_compiled_decode.py tests/test_fused_decode.py 2>&1 | tail -30 | tee "$OUT/pytest_fused.log"
      MARLIN_MLX_PAGED_HEADS=2 timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q --tb=short \
        -p no:cacheprovider -m gpu tests/test_paged_attention.py 2>&1 | tail -20 | tee "$OUT/pytest_paged_h2.log" ;;
    glmheads)
      for p in ${GLM_PROMPTS:-128 8192}; do
        timeout ${GLM_TIMEOUT:-200} python3 benchmarks/decode_probe.py --preset glm-4.7-flash \
          --prompt "$p" --steps 32 --compiled --variants "${GLM_VARIANTS:-auto,auto-h4,auto-h2}" \
          --json "$OUT/decode_probe_glm_heads_p$p.json" 2>&1 | grep -v "^ *[0-9.]* µs x" | tail -8 \
          | tee -a "$OUT/glmheads.log"
      done ;;
    mla)
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
        tests/test_mla_decode.py tests/test_fused_decode.py tests/test_compiled_decode.py 2>&1 \
        | tail -40 | tee "$OUT/pytest_mla.log"
      for p in ${GLM_PROMPTS:-128}; do
        timeout ${GLM_TIMEOUT:-240} python3 benchmarks/decode_probe.py --preset glm-4.7-flash \
          --prompt "$p" --steps 32 --compiled --variants "${GLM_VARIANTS:-auto,auto-nofd}" \
          --profile "${GLM_PROFILE:-auto+compiled}" --json "$OUT/decode_probe_glm_mla_p$p.json" 2>&1 \
          | grep -v "^ *[0-9.]* µs x" | tail -40 | tee -a "$OUT/glm_mla.log"
      done ;;
    hostcost)
      timeout 120 python3 benchmarks/host_cost.py --json "$OUT/host_cost_h200.json" 2>&1 | tee "$OUT/host_cost.log"
      timeout 150 python3 -m pytest -q -m gpu --tb=long -p no:cacheprovider tests/test_mla_decode.py \
        -k glm_decode 2>&1 | tail -60 | tee "$OUT/pytest_glm_fused.log"
      timeout ${GLM_TIMEOUT:-300} python3 benchmarks/decode_probe.py --preset glm-4.7-flash \
        --prompt 128 --steps 32 --compiled --variants auto,auto-nofd --profile "" \
        --buffer-sweep "${GLM_SWEEP:-1000}" --sweep-variants auto,auto-nofd \
        --json "$OUT/decode_probe_glm_ops.json" 2>&1 | grep -v "^ *[0-9.]* µs x" | tail -20 \
        | tee -a "$OUT/glm_ops.log" ;;
    mlamoe)
      timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
        tests/test_paged_attention.py tests/test_moe_kernels.py -k "paged or mla or norm_route or residual or router_kernel or shared_slot" \
        2>&1 | tail -30 | tee "$OUT/pytest_mlamoe.log"
      timeout 60 python3 benchmarks/mla_attention.py --paths sdpa,paged \
        --out "$OUT/mla_attention_h200.json" 2>&1 | tail -12 | tee "$OUT/mla_attention.log"
      MARLIN_MLX_PAGED_HEADS=10 timeout 40 python3 benchmarks/mla_attention.py --paths paged \
        --out "$OUT/mla_attention_h10_h200.json" 2>&1 | tail -6 | tee -a "$OUT/mla_attention.log"
      for p in ${GLM_PROMPTS:-128}; do
        timeout ${GLM_TIMEOUT:-240} python3 benchmarks/decode_probe.py --preset glm-4.7-flash \
          --prompt "$p" --steps 32 --compiled --variants "${GLM_VARIANTS:-auto,auto-nofd}" \
          --profile "${GLM_PROFILE:-auto+compiled}" --json "$OUT/decode_probe_glm_s8_p$p.json" 2>&1 \
          | grep -v "^ *[0-9.]* µs x" | tail -40 | tee -a "$OUT/glm_s8.log"
      done ;;
    glmtest)
      # the GLM-shaped compiled-step tests with their tracebacks, MLA decode paged then sdpa
      for how in paged sdpa; do
        MARLIN_MLX_MLA_DECODE=$how timeout ${TESTS_TIMEOUT:-120} python3 -m pytest -q --tb=long \
          -p no:cacheprovider tests/test_compiled_decode.py -k glm4_moe_lite 2>&1 | tail -60 \
          | tee -a "$OUT/pytest_glm.log"
      done ;;
    whole)
      [ -n "$SKIP_TESTS" ] || timeout ${TESTS_TIMEOUT:-400} python3 -m pytest -q --tb=short \
        -p no:cacheprovider -k "${WHOLE_K:-gpu or glm}" tests/test_mla_decode.py \
        tests/test_compiled_decode.py \
        2>&1 | tail -30 | tee "$OUT/pytest_whole.log"
      for p in ${GLM_PROMPTS:-128}; do
        timeout ${GLM_TIMEOUT:-400} python3 benchmarks/decode_probe.py --preset glm-4.7-flash \
          --prompt "$p" --steps 32 --compiled --variants "${GLM_VARIANTS:-auto,auto-layers}" \
          --env-sweep "${GLM_ENV_SWEEP-MLX_USE_CUDA_GRAPHS=0}" --sweep-variants auto \
          --profile "${GLM_PROFILE:-}" --json "$OUT/decode_probe_glm_s9_p$p.json" $GLM_PROBE_ARGS 2>&1 \
          | grep -v "^ *[0-9.]* µs x" | tail -40 | tee -a "$OUT/glm_s9.log"
      done ;;
    moeprefill)
      timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
        -k prefill tests/test_moe_kernels.py > "$OUT/pytest_moeprefill.log" 2>&1
      tail -5 "$OUT/pytest_moeprefill.log"
      timeout ${PREFILL_TIMEOUT:-300} python3 benchmarks/moe_layer.py --prefill-variants \
        --json "$OUT/gpu_moe_prefill_h200.json" 2>&1 | tail -20 | tee "$OUT/moe_prefill.log" ;;
    blockqmm)
      timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
        tests/test_block_qmm.py tests/test_moe_kernels.py -k "block_qmm or quant_blocks" \
        > "$OUT/pytest_blockqmm.log" 2>&1
      tail -5 "$OUT/pytest_blockqmm.log"
      timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/block_qmm.py --tokens "${BQ_TOKENS:-2048,8192}" \
        --json "$OUT/block_qmm_h200.json" 2>&1 | tail -60 | tee "$OUT/block_qmm.log" ;;
    prefill)
      timeout ${PREFILL_TIMEOUT:-300} python3 benchmarks/prefill_probe.py --preset glm-4.7-flash \
        --prompt 2048 --variants "${PREFILL_VARIANTS:-dequant_blocks,quant_blocks}" \
        --profile --json "$OUT/prefill_probe_glm_h200.json" 2>&1 | tee "$OUT/prefill_probe.log" ;;
    qmvsweep)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout ${NCU_TIMEOUT:-240} "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
        python3 benchmarks/ncu_probe.py --sweep > "$OUT/ncu_sweep.csv" 2> "$OUT/ncu_sweep.err"
      echo "ncu rc=$?"; tail -3 "$OUT/ncu_sweep.err"
      python3 benchmarks/ncu_probe.py --parse "$OUT/ncu_sweep.csv" | grep -E "marlin|qmv" \
        | tee "$OUT/ncu_sweep.txt" | sort -t_ -k1 | head -150 ;;
    stream)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      [ -z "$DETAILS_ONLY" ] && timeout ${NCU_TIMEOUT:-240} "$NCU" --clock-control none \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
        python3 benchmarks/stream_probe.py > "$OUT/stream.csv" 2> "$OUT/stream.err"
      echo "ncu rc=$?"; tail -3 "$OUT/stream.err"
      python3 benchmarks/ncu_probe.py --parse "$OUT/stream.csv" | tee "$OUT/stream_times.txt"
      timeout ${NCU_TIMEOUT:-240} "$NCU" --clock-control none --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        --section SchedulerStats --section LaunchStats --section ComputeWorkloadAnalysis \
        --section InstructionStats -k "regex:${NCU_KERNELS:-marlin|stream|gemv|gemm|nvjet}" \
        python3 benchmarks/stream_probe.py --details > "$OUT/stream_details.txt" 2>&1
      echo "ncu details rc=$?"; grep -cE "^  [a-z_]+.*\(" "$OUT/stream_details.txt" ;;
    patterns)
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout ${NCU_TIMEOUT:-240} "$NCU" --clock-control none \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
        python3 benchmarks/stream_probe.py --patterns > "$OUT/patterns.csv" 2> "$OUT/patterns.err"
      echo "ncu rc=$?"; tail -3 "$OUT/patterns.err"
      python3 benchmarks/ncu_probe.py --parse "$OUT/patterns.csv" | grep stream \
        | tee "$OUT/patterns_times.txt" ;;
    pipe|tc)
      tests=tests/test_qmv_tc.py; [ "$part" = tc ] && tests="$tests tests/test_kernels_gpu.py"
      timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
        $tests > "$OUT/${part}_tests.log" 2>&1; tail -5 "$OUT/${part}_tests.log"
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout ${NCU_TIMEOUT:-300} "$NCU" --clock-control none \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
        python3 benchmarks/stream_probe.py --$part > "$OUT/$part.csv" 2> "$OUT/$part.err"
      echo "ncu rc=$?"; tail -3 "$OUT/$part.err"
      python3 benchmarks/ncu_probe.py --parse "$OUT/$part.csv" | grep -E "marlin|qmv" \
        > "$OUT/${part}_times.txt"; wc -l "$OUT/${part}_times.txt" ;;
    fold)
      timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
        tests/test_qmv_fold.py > "$OUT/fold_tests.log" 2>&1; tail -5 "$OUT/fold_tests.log"
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout ${NCU_TIMEOUT:-300} "$NCU" --clock-control none \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,smsp__inst_executed.sum --csv \
        python3 benchmarks/stream_probe.py --fold > "$OUT/fold.csv" 2> "$OUT/fold.err"
      echo "ncu rc=$?"; tail -3 "$OUT/fold.err"
      python3 benchmarks/ncu_probe.py --parse "$OUT/fold.csv" > "$OUT/fold_times.txt"
      wc -l "$OUT/fold_times.txt"
      [ "${DETAILS:-1}" = 1 ] && timeout ${NCU_TIMEOUT:-240} "$NCU" --clock-control none \
        --section SpeedOfLight --section WarpStateStats --section Occupancy \
        --section SchedulerStats --section LaunchStats --section InstructionStats \
        -k "regex:${NCU_KERNELS:-marlin}" \
        python3 benchmarks/stream_probe.py --details > "$OUT/fold_details.txt" 2>&1
      echo "details rc=$?" ;;
    rows)
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
        tests/test_qmv_fold.py tests/test_fused_decode.py -k fold > "$OUT/pytest_fold_rows.log" 2>&1
      echo "pytest rc=$?"; tail -5 "$OUT/pytest_fold_rows.log"
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout ${NCU_TIMEOUT:-300} "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
        python3 benchmarks/stream_probe.py --rows > "$OUT/rows.csv" 2> "$OUT/rows.err"
      echo "ncu rc=$?"; grep -v LABELS "$OUT/rows.err" | tail -3
      python3 benchmarks/ncu_probe.py --parse-marked "$OUT/rows.csv" "$OUT/rows.err" > "$OUT/rows.json"
      for fold in ${ENGINE_FOLD:-1 0}; do
        MARLIN_MLX_QMV_FOLD=$fold timeout ${ENGINE_TIMEOUT:-120} python3 benchmarks/engine_probe.py \
          --preset qwen3-8b --batch ${ENGINE_BATCH:-1,2,4,8,16} --variants compiled \
          --json "$OUT/engine_probe_qwen3-8b_fold$fold.json" 2>&1 | tail -8 | tee -a "$OUT/engine.log"
      done ;;
    pieces)
      MARLIN_MLX_QMV_FOLD_P16=1 timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -rf --tb=short \
        -p no:cacheprovider -m gpu tests/test_qmv_fold.py tests/test_fused_decode.py \
        -k "fold or fused_gemv" > "$OUT/pytest_fold_pieces.log" 2>&1
      echo "pytest rc=$?"; tail -5 "$OUT/pytest_fold_pieces.log"
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout ${NCU_TIMEOUT:-300} "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
        python3 benchmarks/stream_probe.py --pieces > "$OUT/pieces.csv" 2> "$OUT/pieces.err"
      echo "ncu rc=$?"; grep -v LABELS "$OUT/pieces.err" | tail -3
      python3 benchmarks/ncu_probe.py --parse-marked "$OUT/pieces.csv" "$OUT/pieces.err" \
        > "$OUT/pieces.json" ;;
    flash)
      timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
        tests/test_flash_attention.py tests/test_kernels_gpu.py ${FLASH_TESTS:-} -k "flash or dequant" \
        > "$OUT/pytest_flash.log" 2>&1; echo "pytest rc=$?"
      tail -8 "$OUT/pytest_flash.log"
      timeout ${FLASH_TIMEOUT:-150} python3 benchmarks/flash_attention.py \
        --json "$OUT/flash_attention_h200.json" 2>&1 | tee "$OUT/flash_attention.log" ;;
    large)
      timeout ${TESTS_TIMEOUT:-200} python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
        tests/test_large_qmm.py > "$OUT/pytest_large_qmm.log" 2>&1; echo "pytest rc=$?"
      tail -8 "$OUT/pytest_large_qmm.log"
      timeout ${LARGE_TIMEOUT:-300} python3 benchmarks/large_qmm.py --dtype bfloat16 \
        --ms "${LARGE_MS:-128,256,512,1024,4096}" ${LARGE_SHAPES:+--shapes "$LARGE_SHAPES"} \
        --tilings "${LARGE_TILINGS:-auto}" --out "$OUT/large_qmm_h200.json" 2>&1 \
        | tail -60 | tee "$OUT/large_qmm.log" ;;
    kvdecode)
      timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -rf --tb=short -p no:cacheprovider -m gpu \
        tests/test_buffer_attention.py tests/test_paged_attention.py tests/test_compiled_decode.py tests/test_fused_decode.py \
        tests/test_mla_decode.py -k "${KV_TESTS_K:-buffer or kernel_matches or selection or in_place or fused_equals or whole}" \
        > "$OUT/pytest_kvdecode.log" 2>&1; echo "pytest rc=$?"
      tail -8 "$OUT/pytest_kvdecode.log"
      for preset in ${KV_PRESETS:-qwen3-8b}; do
        for prompt in ${KV_PROMPTS:-128 2048}; do
          timeout ${KV_TIMEOUT:-200} python3 benchmarks/decode_probe.py --preset "$preset" --bits 4 \
            --group-size 64 --prompt "$prompt" --steps 64 --compiled \
            --variants "${KV_VARIANTS:-auto-sdpa,auto-buffers,auto,auto-sdpa,auto-buffers}" \
            --profile "${KV_PROFILE:-auto-sdpa+compiled,auto-buffers+compiled}" \
            --json "$OUT/decode_probe_${preset}_kv_p${prompt}.json" 2>&1 \
            | grep --line-buffered -v "^\s*$" | tail -30 | tee -a "$OUT/kvdecode.log"
        done
      done ;;
    bufattn)
      timeout ${BUF_TIMEOUT:-200} python3 benchmarks/buffer_attention.py \
        --ctx "${BUF_CTX:-128,512,2048,8192,32768}" --out "$OUT/buffer_attention_h200.json" 2>&1 \
        | tail -30 | tee "$OUT/buffer_attention.log" ;;
    *) echo "unknown part $part" ;;
  esac
  echo "== $part: $(( $(date +%s) - t0 )) s"
done
