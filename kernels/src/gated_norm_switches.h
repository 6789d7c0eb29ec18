// The switches of the gated, normed decode GEMV (gated_norm.h, fold_gated_norm.h): gate rows
// in w, up rows in w2 / scales2 / biases2, the RMSNorm weight nw and eps EPS (float32 bits).
#define GATED 1
#define QW2 w2
#define QS2 scales2
#define QB2 biases2
#define NORM 1
#define QNW nw
#define QEPS k_as_float(uint32_t(EPS))
