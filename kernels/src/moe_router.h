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
// Template constants: T (logits), E, TOPK, SOFTMAX, HAS_BIAS, NGRP, TOPKG, NORM, RSF. The grid
// has exactly one threadgroup row per token (no token count in the template: no recompiles).
#define MOE_ARGMAX(v, ei, s)                                                               \
  KUNROLL for (uint32_t o_ = 16; o_ > 0; o_ >>= 1) {                                       \
    const float ov_ = k_simd_xor(v, o_);                                                   \
    const uint32_t oe_ = k_simd_xor_u(ei, o_);                                             \
    const float os_ = k_simd_xor(s, o_);                                                   \
    if (ov_ > v || (ov_ == v && oe_ < ei)) { v = ov_; ei = oe_; s = os_; }                 \
  }
//// BODY
constexpr int EPL = (E + 31) / 32;  // experts per lane
constexpr int GSZ = E / NGRP;
constexpr bool GROUPED = NGRP > 1 && TOPKG < NGRP;
const float NEG_INF = k_as_float(0xFF800000u);
const int t = int(tg_y);
KSHARED float gch[GROUPED ? E : 1];  // choice scores, for the groups' best-two sums
{
  float sc[EPL], ch[EPL];
  KUNROLL for (int i = 0; i < EPL; ++i) {
    const int e = int(lane) + 32 * i;
    sc[i] = (e < E) ? float(logits[size_t(t) * E + e]) : NEG_INF;
  }
  if (SOFTMAX) {
    float m = NEG_INF;
    KUNROLL for (int i = 0; i < EPL; ++i) m = (sc[i] > m) ? sc[i] : m;
    KUNROLL for (uint32_t o = 16; o > 0; o >>= 1) {
      const float om = k_simd_xor(m, o);
      m = (om > m) ? om : m;
    }
    float s = 0.0f;
    KUNROLL for (int i = 0; i < EPL; ++i) {
      const int e = int(lane) + 32 * i;
      ch[i] = sc[i];
      sc[i] = (e < E) ? k_exp(sc[i] - m) : 0.0f;
      s += sc[i];
    }
    s = k_simd_sum(s);
    KUNROLL for (int i = 0; i < EPL; ++i) sc[i] = sc[i] / s;
  } else {
    KUNROLL for (int i = 0; i < EPL; ++i) {
      const int e = int(lane) + 32 * i;
      sc[i] = (e < E) ? k_sigmoid(sc[i]) : 0.0f;
      ch[i] = (e < E) ? sc[i] : NEG_INF;
    }
  }
  if (HAS_BIAS) {
    KUNROLL for (int i = 0; i < EPL; ++i) {
      const int e = int(lane) + 32 * i;
      if (e < E) ch[i] = sc[i] + float(bias[e]);
    }
  }
  if (GROUPED) {
    KUNROLL for (int i = 0; i < EPL; ++i) {
      const int e = int(lane) + 32 * i;
      if (e < E) gch[e] = ch[i];
    }
    KBARRIER();
    float gsc = NEG_INF;
    if (int(lane) < NGRP) {
      float a = NEG_INF, b = NEG_INF;
      for (int q = 0; q < GSZ; ++q) {
        const float v = gch[int(lane) * GSZ + q];
        if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
      }
      gsc = (GSZ >= 2) ? a + b : a;
    }
    uint32_t keep = 0u;
    for (int r = 0; r < TOPKG; ++r) {
      float v = gsc, dummy = 0.0f;
      uint32_t gi = lane;
      MOE_ARGMAX(v, gi, dummy)
      keep |= 1u << gi;
      if (lane == gi) gsc = NEG_INF;
    }
    KUNROLL for (int i = 0; i < EPL; ++i) {
      const int e = int(lane) + 32 * i;
      if (e < E && !((keep >> (e / GSZ)) & 1u)) ch[i] = NEG_INF;
    }
  }
  uint32_t isel[TOPK];
  float wsel[TOPK];
  float wsum = 0.0f;
  KUNROLL for (int j = 0; j < TOPK; ++j) {
    float v = ch[0], s = sc[0];
    uint32_t ei = lane;
    KUNROLL for (int i = 1; i < EPL; ++i) {
      if (ch[i] > v) { v = ch[i]; s = sc[i]; ei = lane + 32u * uint32_t(i); }
    }
    MOE_ARGMAX(v, ei, s)
    KUNROLL for (int i = 0; i < EPL; ++i) {
      if (lane + 32u * uint32_t(i) == ei) ch[i] = NEG_INF;
    }
    isel[j] = ei;
    wsel[j] = s;
    wsum += s;
  }
  if (lane == 0) {
    const float rsf = k_as_float(uint32_t(RSF));
    KUNROLL for (int j = 0; j < TOPK; ++j) {
      float wj = NORM ? wsel[j] / (wsum + 1e-20f) : wsel[j];
      inds[size_t(t) * TOPK + j] = isel[j];
      weights[size_t(t) * TOPK + j] = wj * rsf;
    }
  }
}
