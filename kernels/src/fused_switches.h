// Defaults of the decode-fusion switches shared by qmv_core.h and fold_core.h (plain GEMV unless
// the including header set them before `//// BODY`). GATED: a second weight set (QW2/QS2/QB2)
// and silu(gate) * up; NORM: RMSNorm of x with weight QNW and eps QEPS folded in; RES: the
// residual row QRES added to y.
#ifndef GATED
#define GATED 0
#define QW2 w
#define QS2 scales
#define QB2 biases
#endif
#ifndef NORM
#define NORM 0
#define QNW x
#define QEPS 0.0f
#endif
#ifndef RES
#define RES 0
#define QRES x
#endif
