// fold_gated_norm: silu(Wg . rmsnorm(x)) * (Wu . rmsnorm(x)) on the folded decode GEMV (see
// qmv_fold.h and gated_norm.h): gate rows are tile 0 and up rows tile 1 of every simdgroup
// (RT = 2). Template constants as qmv_fold, plus EPS (eps's float32 bits).
//// INCLUDE fold_common.h
//// INCLUDE gated_norm_switches.h
//// BODY
//// INCLUDE fold_core.h
