// qmv_norm: y[m] = W . rmsnorm(x[m]) = (W . (x[m] * nw)) / rms(x[m]) for an affine-quantized W,
// the RMSNorm in front of a decode-time projection fused into the GEMV (NORM = 1): x is read
// raw, multiplied by the norm weight `nw` (x's dtype) as it is loaded, and the row's
// 1 / sqrt(mean(x^2) + eps) scales the finished dot products. Every threadgroup covers all of
// K, so it sums x^2 itself. Template constants as qmv, plus EPS (eps's float32 bits).
//// INCLUDE quant_common.h
#define NORM 1
#define QNW nw
#define QEPS k_as_float(uint32_t(EPS))
//// BODY
//// INCLUDE qmv_core.h
