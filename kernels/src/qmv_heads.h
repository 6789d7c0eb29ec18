// qmv_heads: y[h * RH + r] = W[h * RH + r] . x[h * XH : h * XH + K] for H per-head matrices
// stacked as N = H * RH rows in MLX's affine layout (one x row). MLA's decode output side:
// the attention's per-head latent (XH = K = kv_lora_rank) through `unembed_out` to each
// head's values, written head after head, as the output projection reads them (HEADS = 1).
// Template constants as qmv, plus XH (x elements per head) and RH (rows per head, a multiple
// of R).
//// INCLUDE quant_common.h
#define HEADS 1
#define QXH XH
#define QRH RH
#define QYH RH
//// BODY
//// INCLUDE qmv_core.h
