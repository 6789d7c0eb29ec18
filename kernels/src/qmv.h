// qmv: y[m, n] = sum_k x[m, k] * (scales[n, g] * q[n, k] + biases[n, g]),  g = k / GS,
// for weights in MLX's affine layout (q packed little-endian along k in uint32 words).
//
// Layout of the work: one simdgroup (warp) owns R output rows; the SK simdgroups of a
// threadgroup split K between them (split-K for short outputs) and meet in threadgroup memory.
// Each lane takes 32 consecutive k per step: BITS words of every one of its R rows, loaded as
// 16-byte vectors where BITS allows, so R * BITS / 4 independent 16-byte loads are in flight.
// The affine bias is folded in as (bias + C * scale) * sum(x over the step), with C = 2^(BITS-1)
// the centre the codes are shifted by. The inner loop is one logic op and one FMA per weight,
// plus one FMA per weight and row of x: a code masked in place and OR-ed into the mantissa of
// 2^23 is an exact float (2^23 + q * 2^s); one FMA by 2^-s minus (2^(23-s) + C) makes it
// q - C, exactly.
//
// Template constants: T (x and y), S (scales, biases), XK (0 float32, 1 float16, 2 bfloat16),
// BITS, GS, R, SK, PF (prefetch the next step), M (rows of x per threadgroup), MT (rows of x
// in all), K, N.
// The body is qmv_core.h, shared with gated_mlp.h (GATED = 1 reads a second weight set) and
// the fused decode variants qmv_norm.h, qmv_res.h and gated_norm.h (NORM, RES).
//// INCLUDE quant_common.h
//// BODY
//// INCLUDE qmv_core.h
