// gated_norm: silu(Wg . rmsnorm(x)) * (Wu . rmsnorm(x)): the post-attention RMSNorm and the fused
// gate/up projections of a decode-time MLP in one launch (GATED = 1, NORM = 1; see qmv_norm.h
// for how the norm is folded in). Template constants as qmv, plus EPS (eps's float32 bits).
//// INCLUDE quant_common.h
//// INCLUDE gated_norm_switches.h
//// BODY
//// INCLUDE qmv_core.h
