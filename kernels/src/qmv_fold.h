// qmv_fold: y[m, n] = sum_k x[m, k] * (scales[n, g] * q[n, k] + biases[n, g]) for 1-8 rows
// of x (decode, batched decode), 4-bit codes in MLX's affine layout, on m16n8k16 tensor cores
// with the affine dequantization folded into one float epilogue per group.
//
// Why: the decode GEMV ran at 1.7-2x the time of a plain read of its bytes because it issued
// 4.3-5.8 instructions per weight (KERNEL_NOTES "Session 12"). Here a code goes into the
// products as its magic-number value (1024 + q as float16, 128 + q as bfloat16: one mask-or for
// two codes, no subtraction, no scale FMA in 16-bit), and each group's products land in a fresh
// float accumulator D. The group's affine step is then done once per row in float:
//   sum_k x w = s * (D - OFF) + b * X,   OFF = base * sum_k x,  X = sum_k x,
// where OFF and X come from one more product per 16 k with a constant A (shared by all rows).
// float16 takes the odd codes of a word at 16 q (mask 0x00F000F0, no shift) and meets them with
// x / 16, which is exact; bfloat16 has too few mantissa bits for that and shifts instead.
//
// Work: a threadgroup owns TR = 16 * RT weight rows; SK simdgroups split K in steps of 256.
// In a step, lane L of the simdgroup stages word slot L (8 values of x) of each row of x in
// fragment order in threadgroup memory; lane 4 g + c then takes, for every group of the step,
// WPL = GS / 32 consecutive code words of rows g and g + 8 of each row tile (one load per row
// and group), so the 16 k of each product sit in one group, and product column g is x row g.
// With one row of x and one row tile (P16) a lane instead reads 16-byte pieces of 4 words and
// the product's columns carry the piece's groups (fold_core.h, PIECES). With PF the next
// step's codes, scales, biases and x are loaded into registers before this step's products
// (kept raw: nothing waits on them). Needs K % 256 == 0, 16-bit x and 16-bit scales
// (qmv.fold_supported).
//
// The fused decode variants fold_norm.h, fold_res.h and fold_gated_norm.h set switches of the
// same body (fold_core.h; helpers in fold_common.h).
//
// Template constants: T (x and y), S (scales, biases), XK (x kind: 1 float16, 2 bfloat16),
// SXK (scale kind, same codes), GS (32, 64, 128), RT, SK, PF (register prefetch), MR (rows
// bound: 1 or 8; the row count is the run-time input `rows`), P16, K, N.
//// INCLUDE fold_common.h
//// BODY
//// INCLUDE fold_core.h
