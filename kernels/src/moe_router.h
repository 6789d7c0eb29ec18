// moe_router: one simdgroup (warp) per token turns router logits (tokens, E) into the top-k
// expert indices (descending by choice score, ties to the lower index) and their weights.
//
// scores: softmax(logits) (SOFTMAX) or sigmoid(logits). choice = scores + bias when HAS_BIAS
// (GLM/DeepSeek's e_score_correction_bias, for selection only), else the logits (softmax is
// monotonic: the same experts, without softmax's rounding) or the sigmoid scores. With
// grouping (NGRP > 1, TOPKG < NGRP) a group's score is the sum of its best two choice scores
// and only the best TOPKG groups stay eligible (others -inf, as transformers masks them).
// weights = scores of the chosen experts, divided by (their sum + 1e-20) when NORM, times the
// routed scaling factor (its float32 bits in RSF).
// Lane l holds experts l, l + 32, ...: a local best (ascending index, strict >) then a xor
// butterfly on (value, index) pairs gives every lane the same winner, TOPK times.
//
// The routing itself is moe_route_core.h (shared with moe_route_norm.h).
// Template constants: T (logits), E, TOPK, SOFTMAX, HAS_BIAS, NGRP, TOPKG, NORM, RSF. The grid
// has exactly one threadgroup row per token (no token count in the template: no recompiles).
//// BODY
const int t = int(tg_y);
#define ROUTER_LOGIT(e) float(logits[size_t(t) * E + (e)])
#define ROUTER_WRITES true
//// INCLUDE moe_route_core.h
