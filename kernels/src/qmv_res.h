// qmv_res: y[m] = res[m] + W . x[m] for an affine-quantized W: a decode-time output projection
// and the residual add after it in one launch (RES = 1; `res` has y's shape and dtype).
// Template constants as qmv.
//// INCLUDE quant_common.h
#define RES 1
#define QRES res
//// BODY
//// INCLUDE qmv_core.h
