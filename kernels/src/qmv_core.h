// Variant switches, set by the including header before `//// BODY`; these defaults are plain
// qmv. GATED: a second weight set (QW2/QS2/QB2) and silu(gate) * up; NORM: RMSNorm of x with
// weight QNW and eps QEPS folded in; RES: the residual row QRES added to y. HEADS: a batch of
// per-head matrices stacked as N rows (one x row, M = 1): rows [h * QRH, (h + 1) * QRH) read x
// from element h * QXH and write y from element h * QYH (QRH a multiple of R).
//// INCLUDE fused_switches.h
#ifndef HEADS
#define HEADS 0
#define QXH 0
#define QRH 1
#define QYH 1
#endif
constexpr int KW = K * BITS / 32;      // words per weight row
constexpr int NG = K / GS;             // groups per row
constexpr int CH = K / 32;             // 32-value steps per row
constexpr bool FAST = (BITS == 2 || BITS == 4 || BITS == 8);  // codes never straddle 16 bits
constexpr uint32_t MASK = (1u << BITS) - 1u;
constexpr float CENTER = float(1 << (BITS - 1));

constexpr int RR = GATED ? 2 * R : R;  // rows read: gated reads R gate rows then R up rows
const int row0 = int(tg_x) * R;
const int mbase = int(tg_y) * M;
const size_t xoff = HEADS ? size_t(row0 / QRH) * QXH : size_t(0);  // this head's x

float acc[RR][M];
float ssq[M];  // NORM: this lane's share of sum(x^2) of each row
KUNROLL for (int m = 0; m < M; ++m) {
  ssq[m] = 0.0f;
  KUNROLL for (int r = 0; r < RR; ++r) acc[r][m] = 0.0f;
}

// Codes, scales and biases of step cc for all RR rows (rows past N clamp to N - 1: valid
// loads, no writes).
#define QMV_LOAD_STEP(cc, WV, SC, BC)                                                      \
  {                                                                                        \
    const int g_ = ((cc) * 32) / GS;                                                       \
    KUNROLL for (int r = 0; r < RR; ++r) {                                                 \
      const int rr_ = (r < R) ? r : r - R;                                                 \
      const int row_ = (row0 + rr_ < N) ? (row0 + rr_) : (N - 1);                          \
      const KDEV uint32_t* wp_ = ((r < R) ? w : QW2) + size_t(row_) * KW + size_t(cc) * BITS; \
      K_LOAD_CODES(WV[r], wp_)                                                             \
      SC[r] = float(((r < R) ? scales : QS2)[size_t(row_) * NG + g_]);                     \
      BC[r] = float(((r < R) ? biases : QB2)[size_t(row_) * NG + g_]);                     \
    }                                                                                      \
  }

// Software pipelining (PF = 1): the next step's loads are issued before this step's
// arithmetic, so every warp keeps 16-byte loads in flight while it computes (more registers).
uint32_t nwv[RR][BITS];
float nsc[RR], nbc[RR];
int c = int(simd_id) * 32 + int(lane);
if (PF && c < CH) QMV_LOAD_STEP(c, nwv, nsc, nbc)
for (; c < CH; c += 32 * SK) {
  if (!PF) QMV_LOAD_STEP(c, nwv, nsc, nbc)
  uint32_t wv[RR][BITS];
  float sc[RR], bc[RR];
  KUNROLL for (int r = 0; r < RR; ++r) {
    KUNROLL for (int i = 0; i < BITS; ++i) wv[r][i] = nwv[r][i];
    sc[r] = nsc[r];
    bc[r] = nbc[r] + CENTER * nsc[r];
  }
  if (PF && c + 32 * SK < CH) QMV_LOAD_STEP(c + 32 * SK, nwv, nsc, nbc)

  float part[RR][M];
  float sx[M];
  KUNROLL for (int m = 0; m < M; ++m) {
    sx[m] = 0.0f;
    KUNROLL for (int r = 0; r < RR; ++r) part[r][m] = 0.0f;
  }

  KUNROLL for (int j0 = 0; j0 < 32; j0 += 8) {
    // x for 8 consecutive k: one 16-byte load per row of x (two for float32).
    float xf[M][8];
    float gw[8];  // NORM: the RMSNorm weight of these k (x's dtype; not `nw`, the input)
    if (NORM) K_LOAD_X8(gw, QNW + size_t(c) * 32 + j0)
    KUNROLL for (int m = 0; m < M; ++m) {
      const int mr = (mbase + m < MT) ? (mbase + m) : (MT - 1);
      K_LOAD_X8(xf[m], x + xoff + size_t(mr) * K + size_t(c) * 32 + j0)
      if (NORM) {  // x * w now, x / rms(x) once per output (the rms is a scalar per row)
        KUNROLL for (int jj = 0; jj < 8; ++jj) {
          ssq[m] = k_fma(xf[m][jj], xf[m][jj], ssq[m]);
          xf[m][jj] *= gw[jj];
        }
      }
      KUNROLL for (int jj = 0; jj < 8; ++jj) sx[m] += xf[m][jj];
    }
    KUNROLL for (int r = 0; r < RR; ++r) {
      KUNROLL for (int jj = 0; jj < 8; ++jj) {
        float q;
        K_AFFINE_CODE(q, wv[r], j0 + jj)
        KUNROLL for (int m = 0; m < M; ++m) part[r][m] = k_fma(xf[m][jj], q, part[r][m]);
      }
    }
  }
  KUNROLL for (int r = 0; r < RR; ++r) {
    KUNROLL for (int m = 0; m < M; ++m) acc[r][m] += sc[r] * part[r][m] + bc[r] * sx[m];
  }
}

KSHARED float red[SK][(RR + 1) * M];  // the last M: NORM's sums of squares
KUNROLL for (int r = 0; r < RR; ++r) {
  KUNROLL for (int m = 0; m < M; ++m) {
    const float v = k_simd_sum(acc[r][m]);
    if (lane == 0) red[simd_id][r * M + m] = v;
  }
}
if (NORM) {  // every k of a row passes through exactly one lane of this threadgroup
  KUNROLL for (int m = 0; m < M; ++m) {
    const float v = k_simd_sum(ssq[m]);
    if (lane == 0) red[simd_id][RR * M + m] = v;
  }
}
KBARRIER();
if (simd_id == 0) {
  for (int i = int(lane); i < R * M; i += 32) {
    float v = 0.0f, u = 0.0f;
    KUNROLL for (int k = 0; k < SK; ++k) v += red[k][i];
    if (GATED) {
      KUNROLL for (int k = 0; k < SK; ++k) u += red[k][R * M + i];
    }
    if (NORM) {
      float s2 = 0.0f;
      KUNROLL for (int k = 0; k < SK; ++k) s2 += red[k][RR * M + i % M];
      const float inv = k_rsqrt(s2 / float(K) + QEPS);
      v *= inv;
      u *= inv;
    }
    if (GATED) v = k_silu(v) * u;  // silu(gate) * up
    const int row = row0 + i / M;
    const int m = mbase + i % M;
    if (row < N && m < MT) {
      if (RES) v += float(QRES[size_t(m) * N + row]);
      const size_t yi = HEADS ? size_t(row / QRH) * QYH + size_t(row % QRH) : size_t(m) * N + row;
      y[yi] = static_cast<T>(v);
    }
  }
}
