// qmv_res: y[m] = res[m] + W . x[m] for an affine-quantized W: a decode-time output projection
// and the residual add after it in one launch (RES = 1; `res` has y's shape and dtype).
// Template constants as qmv.
//// INCLUDE quant_common.h
#define GATED 0
#define QW2 w
#define QS2 scales
#define QB2 biases
#define NORM 0
#define QNW x
#define QEPS 0.0f
#define RES 1
#define QRES res
//// BODY
//// INCLUDE qmv_core.h
