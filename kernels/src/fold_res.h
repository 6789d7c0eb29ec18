// fold_res: y = res + W . x on the folded decode GEMV (see qmv_fold.h). Template constants as
// qmv_fold.
//// INCLUDE fold_common.h
#define RES 1
#define QRES res
//// BODY
//// INCLUDE fold_core.h
