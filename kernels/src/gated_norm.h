// gated_norm: silu(Wg . rmsnorm(x)) * (Wu . rmsnorm(x)): the post-attention RMSNorm and the fused
// gate/up projections of a decode-time MLP in one launch (GATED = 1, NORM = 1; see qmv_norm.h
// for how the norm is folded in). Template constants as qmv, plus EPS (eps's float32 bits).
//// INCLUDE quant_common.h
#define GATED 1
#define QW2 w2
#define QS2 scales2
#define QB2 biases2
#define NORM 1
#define QNW nw
#define QEPS k_as_float(uint32_t(EPS))
//// BODY
//// INCLUDE qmv_core.h
