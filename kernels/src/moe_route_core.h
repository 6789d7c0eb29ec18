// moe_route_core: the routing of one token (row t) from its E router logits, ROUTER_LOGIT(e)
// (a float), to the top-k indices and weights written by the simdgroups for which
// ROUTER_WRITES holds. Every simdgroup that runs it computes the same result (lane l holds
// experts l, l + 32, ...); the grouped selection has one barrier, so a threadgroup of several
// simdgroups runs it in all of them. Included by moe_router.h and moe_route_norm.h (after
// their helpers). MOE_ARGMAX: the lane butterfly on (value, index, score) triples.
#define MOE_ARGMAX(v, ei, s)                                                               \
  KUNROLL for (uint32_t o_ = 16; o_ > 0; o_ >>= 1) {                                       \
    const float ov_ = k_simd_xor(v, o_);                                                   \
    const uint32_t oe_ = k_simd_xor_u(ei, o_);                                             \
    const float os_ = k_simd_xor(s, o_);                                                   \
    if (ov_ > v || (ov_ == v && oe_ < ei)) { v = ov_; ei = oe_; s = os_; }                 \
  }
constexpr int EPL = (E + 31) / 32;  // experts per lane
constexpr int GSZ = E / NGRP;
constexpr bool GROUPED = NGRP > 1 && TOPKG < NGRP;
const float NEG_INF = k_as_float(0xFF800000u);
KSHARED float gch[GROUPED ? E : 1];  // choice scores, for the groups' best-two sums
{
  float sc[EPL], ch[EPL];
  KUNROLL for (int i = 0; i < EPL; ++i) {
    const int e = int(lane) + 32 * i;
    sc[i] = (e < E) ? ROUTER_LOGIT(e) : NEG_INF;
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
      if (e < E && ROUTER_WRITES) gch[e] = ch[i];
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
  if (lane == 0 && ROUTER_WRITES) {
    const float rsf = k_as_float(uint32_t(RSF));
    KUNROLL for (int j = 0; j < TOPK; ++j) {
      float wj = NORM ? wsel[j] / (wsum + 1e-20f) : wsel[j];
      inds[size_t(t) * TOPK + j] = isel[j];
      weights[size_t(t) * TOPK + j] = wj * rsf;
    }
  }
}
