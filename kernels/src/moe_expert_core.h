// Shared body of moe_gate_up.h (GATED 1) and moe_down.h (GATED 0), and of their _shared
// variants (MOE_SHARED 1: an always-active shared expert as one more slot, weight 1): an
// affine-quantized GEMV over stacked experts (NE, N, K) whose expert is looked up per step
// from `inds`, so only the selected experts' rows are read.
//
// A token t has SLOTS = TOPK + MOE_SHARED slots; slot j < TOPK is expert inds[t * TOPK + j]
// with routing weight wts[t * TOPK + j], slot TOPK the shared expert (its own 2-D weights).
// GATED: threadgroup y = a (token, slot) pair p = t * SLOTS + j;
//   h[p, n] = weight * silu(x[t] . Wg[n]) * (x[t] . Wu[n]): one pass over both weights.
// down: threadgroup y = a token t; the reduction runs over the slots' K values in a row,
//   y[t, n] = sum_j h[t * SLOTS + j] . Wd_j[n]: down projection and weighted combine in one
//   launch (the routing weights are already in h, from the gated pass).
// Work layout as qmv's: a simdgroup owns R rows (GATED: R gate + R up rows), the SK simdgroups
// of a threadgroup split the reduction, each lane takes 32 consecutive k per step with the
// affine bias folded in as (bias + C * scale) * sum(x), C = 2^(BITS-1) the centre the codes
// are shifted by (see qmv.h for the exact one-FMA dequantization).
// MOE_RES (down only, defined by moe_down_shared_res.h): the residual stream `res` (O) is
// added to each output row (the layer's residual add, one launch fewer per token).
// Template constants: T (x), XK (0 float32, 1 float16, 2 bfloat16), S (scales, biases), O (y),
// BITS, GS, R, SK, TOPK, NE, K, N.
#ifndef MOE_RES
#define MOE_RES 0
#endif
constexpr int KW = K * BITS / 32;      // words per weight row
constexpr int NG = K / GS;             // groups per row
constexpr int CH = K / 32;             // 32-value steps per row
constexpr int SLOTS = TOPK + MOE_SHARED;
constexpr int STEPS = GATED ? CH : SLOTS * CH;
constexpr bool FAST = (BITS == 2 || BITS == 4 || BITS == 8);
constexpr uint32_t MASK = (1u << BITS) - 1u;
constexpr float CENTER = float(1 << (BITS - 1));
constexpr int RR = GATED ? 2 * R : R;
const int row0 = int(tg_x) * R;
const int item = int(tg_y);
const int t_item = GATED ? item / SLOTS : item;  // the token
const int j_item = item - t_item * SLOTS;         // GATED: its slot
KSHARED float red[SK][RR];

float acc[RR];
KUNROLL for (int r = 0; r < RR; ++r) acc[r] = 0.0f;

for (int c = int(simd_id) * 32 + int(lane); c < STEPS; c += 32 * SK) {
  const int j = GATED ? j_item : c / CH;
  const int cc = GATED ? c : c - j * CH;
  const bool shr = MOE_SHARED && j == TOPK;
  uint32_t e = shr ? 0u : inds[t_item * TOPK + j];
  e = (e < uint32_t(NE)) ? e : uint32_t(NE - 1);  // never read outside the stack
  const int g = (cc * 32) / GS;
  uint32_t wv[RR][BITS];
  float sc[RR], bc[RR];
  KUNROLL for (int r = 0; r < RR; ++r) {
    const int rr = (r < R) ? r : r - R;
    const int row = (row0 + rr < N) ? (row0 + rr) : (N - 1);
    const size_t erow = size_t(e) * N + size_t(row);
    const KDEV uint32_t* wb = shr ? ((r < R) ? MOE_SW : MOE_SW2) : ((r < R) ? w : MOE_W2);
    const KDEV S* sb = shr ? ((r < R) ? MOE_SS : MOE_SS2) : ((r < R) ? scales : MOE_S2);
    const KDEV S* bb = shr ? ((r < R) ? MOE_SB : MOE_SB2) : ((r < R) ? biases : MOE_B2);
    const KDEV uint32_t* wp = wb + erow * KW + size_t(cc) * BITS;
    K_LOAD_CODES(wv[r], wp)
    sc[r] = float(sb[erow * NG + g]);
    bc[r] = float(bb[erow * NG + g]) + CENTER * sc[r];
  }
  const KDEV T* xrow = x + size_t(GATED ? t_item : item * SLOTS + j) * K + size_t(cc) * 32;
  float part[RR];
  KUNROLL for (int r = 0; r < RR; ++r) part[r] = 0.0f;
  float sx = 0.0f;
  KUNROLL for (int j0 = 0; j0 < 32; j0 += 8) {
    float xf[8];
    K_LOAD_X8(xf, xrow + j0)
    KUNROLL for (int jj = 0; jj < 8; ++jj) sx += xf[jj];
    KUNROLL for (int r = 0; r < RR; ++r) {
      KUNROLL for (int jj = 0; jj < 8; ++jj) {
        float q;
        K_AFFINE_CODE(q, wv[r], j0 + jj)
        part[r] = k_fma(xf[jj], q, part[r]);
      }
    }
  }
  KUNROLL for (int r = 0; r < RR; ++r) acc[r] += sc[r] * part[r] + bc[r] * sx;
}

KUNROLL for (int r = 0; r < RR; ++r) {
  const float v = k_simd_sum(acc[r]);
  if (lane == 0) red[simd_id][r] = v;
}
KBARRIER();
if (simd_id == 0 && int(lane) < R) {
  const int row = row0 + int(lane);
  float v = 0.0f;
  KUNROLL for (int k = 0; k < SK; ++k) v += red[k][lane];
  if (GATED) {
    float u = 0.0f;
    KUNROLL for (int k = 0; k < SK; ++k) u += red[k][R + int(lane)];
    v = k_silu(v) * u * MOE_WT(t_item * TOPK + j_item, MOE_SHARED && j_item == TOPK);
  }
#if MOE_RES
  // the residual add as the separate add rounds it: y = T(res + T(v))
  if (row < N) v = float(static_cast<O>(v)) + float(res[size_t(item) * N + row]);
#endif
  if (row < N) y[size_t(item) * N + row] = static_cast<O>(v);
}
