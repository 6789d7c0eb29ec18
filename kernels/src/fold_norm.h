// fold_norm: y = W . rmsnorm(x) on the folded decode GEMV (see qmv_fold.h, and qmv_norm.h for
// how the norm is folded in). Template constants as qmv_fold, plus EPS (eps's float32 bits).
//// INCLUDE fold_common.h
#define NORM 1
#define QNW nw
#define QEPS k_as_float(uint32_t(EPS))
//// BODY
//// INCLUDE fold_core.h
