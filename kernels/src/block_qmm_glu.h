// block_qmm_glu: block_qmm (block_qmm.h) over two stacks, gate (w) and up (w2), writing
// silu(x W^T) * (x W2^T): the gate and up projections of the experts and their SwiGLU in one pass.
#define BQ_GATED 1
//// INCLUDE block_qmm.h
