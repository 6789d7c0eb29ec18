// gated_mlp: y[m, n] = silu(x[m] . Wg[n]) * (x[m] . Wu[n]) for affine-quantized gate and up
// projections, in one pass over both weights (one launch; x read once per simdgroup for the
// 2R rows it owns). Same body as qmv (qmv_core.h) with GATED = 1; template constants as qmv.
//// INCLUDE quant_common.h
#define GATED 1
#define QW2 w2
#define QS2 scales2
#define QB2 biases2
//// BODY
//// INCLUDE qmv_core.h
