// The folded decode GEMV's body (see qmv_fold.h), shared by its fused variants.
// Variant switches (fused_switches.h; set by fold_norm.h, fold_res.h, fold_gated_norm.h):
// GATED reads gate rows (w) as tile 0 and up rows (QW2/QS2/QB2) as tile 1 of the same outputs
// (RT = 2) and writes silu(gate) * up; NORM multiplies x by QNW as it is staged, sums x^2 and
// scales each output by 1 / rms(x) (eps QEPS); RES adds QRES[m, n].
//// INCLUDE fused_switches.h
constexpr int KW = K / 8;            // code words per weight row
constexpr int NG = K / GS;           // groups per row
constexpr int U = 256 / GS;          // groups per step
constexpr int WPL = GS / 32;         // code words per lane, row and group
constexpr int SWR = U / 2;           // words of scales (or biases) per row and step
constexpr int STEPS = K / 256;
constexpr int TR = GATED ? 16 : 16 * RT;  // output rows of a threadgroup
constexpr int RED = MR * 16 * RT;    // split-K sums per simdgroup (x row major), then NORM's
// PIECES (P16, one row of x): a lane reads a row's codes as 16-byte pieces of 4 words, which
// hold NC = 4 / WPL groups across the piece's 4 lanes. Product column j then carries the
// group of lanes c with c / WPL = j (x at their k positions, zeros elsewhere), so each
// column's sum stays inside one group. Else a lane reads its WPL words of every group.
constexpr bool PIECES = P16 && MR == 1;
constexpr int NC = 4 / WPL;
// Row pitch of the staged x (16-byte slots): one row has a zero slot (32) for PIECES' empty
// columns; with more rows, lanes of rows g and g + 1 read other banks
constexpr int XP = 32 + (MR == 1 ? 1 : (WPL == 1 ? 4 : 1));

const int g = int(lane) >> 2;
const int c = int(lane) & 3;
const int n0 = int(tg_x) * TR;
const int MT = (MR == 1) ? 1 : int(rows[0]);  // rows of x (run time: one kernel per MR)

KSHARED uint4 xs[SK][MR][XP];  // each simdgroup's step of x, by row and word slot
KSHARED float red[SK][RED + MR];  // row sums (gate, then up), then NORM's sums of x^2

// tot[t][r][h]: weight row 16 t + 8 r + g (GATED: tile t is gate / up) times x row 2 c + h
// (the products' column layout)
float tot[RT][2][2];
KUNROLL for (int t = 0; t < RT; ++t) {
  KUNROLL for (int r = 0; r < 2; ++r) { tot[t][r][0] = 0.0f; tot[t][r][1] = 0.0f; }
}
float ssq[MR];  // NORM: this lane's share of sum(x^2), per x row
KUNROLL for (int m = 0; m < MR; ++m) ssq[m] = 0.0f;

// NW consecutive words from p into d[0 .. NW) (16-, 8- or 4-byte loads)
#define FOLD_WORDS(NW, d, p)                                                               \
  if ((NW) % 4 == 0) {                                                                     \
    KUNROLL for (int i_ = 0; i_ < (NW) / 4; ++i_) {                                        \
      const uint4 v_ = ((const KDEV uint4*)(p))[i_];                                       \
      d[4 * i_] = v_.x; d[4 * i_ + 1] = v_.y; d[4 * i_ + 2] = v_.z; d[4 * i_ + 3] = v_.w;  \
    }                                                                                      \
  } else if ((NW) % 2 == 0) {                                                              \
    KUNROLL for (int i_ = 0; i_ < (NW) / 2; ++i_) {                                        \
      const uint2 v_ = ((const KDEV uint2*)(p))[i_];                                       \
      d[2 * i_] = v_.x; d[2 * i_ + 1] = v_.y;                                              \
    }                                                                                      \
  } else {                                                                                 \
    KUNROLL for (int i_ = 0; i_ < (NW); ++i_) d[i_] = (p)[i_];                             \
  }

// Loads of step s_: WV[t][r][8] code words (word u WPL + i: word i of group u; PIECES: word
// 4 p + j: word j of piece p), SV / BV[t][r][i] scale / bias words, XV this lane's 8 values of
// x (one row; more rows: FOLD_LOAD_ROWS) and NV of the norm weight. Rows past N read row N - 1
// and are not written; GATED: tile 1 reads the up rows of the same outputs.
#define FOLD_LOAD(s_, WV, SV, BV, XV, NV)                                                  \
  {                                                                                        \
    KUNROLL for (int t = 0; t < RT; ++t) {                                                 \
      KUNROLL for (int r = 0; r < 2; ++r) {                                                \
        const int rw_ = n0 + (GATED ? 0 : 16 * t) + 8 * r + g;                             \
        const int row_ = (rw_ < N) ? rw_ : (N - 1);                                        \
        const bool up_ = GATED && t == 1;                                                  \
        const KDEV uint32_t* wp_ = (up_ ? QW2 : w) + size_t(row_) * KW + size_t(s_) * 32;  \
        if (PIECES) {                                                                      \
          FOLD_WORDS(4, WV[t][r], wp_ + 4 * c)                                             \
          FOLD_WORDS(4, (WV[t][r] + 4), wp_ + 16 + 4 * c)                                  \
        } else {                                                                           \
          KUNROLL for (int u = 0; u < U; ++u) {                                            \
            FOLD_WORDS(WPL, (WV[t][r] + u * WPL), wp_ + u * 4 * WPL + c * WPL)             \
          }                                                                                \
        }                                                                                  \
        const size_t so_ = size_t(row_) * NG + size_t(s_) * U;                             \
        FOLD_WORDS(SWR, SV[t][r], (const KDEV uint32_t*)((up_ ? QS2 : scales) + so_))      \
        FOLD_WORDS(SWR, BV[t][r], (const KDEV uint32_t*)((up_ ? QB2 : biases) + so_))      \
      }                                                                                    \
    }                                                                                      \
    if (MR == 1) XV = ((const KDEV uint4*)(x + size_t(s_) * 256))[lane];                   \
    if (NORM) NV = ((const KDEV uint4*)(QNW + size_t(s_) * 256))[lane];                    \
  }

// The products of a step group by group: each product takes word i of group u from all 4
// lanes, so its 16 k stay in one group; product column g is x row g (columns past MT repeat
// the last row).
#define FOLD_GROUPS(WV, SV, BV)                                                            \
    KUNROLL for (int u = 0; u < U; ++u) {                                                  \
      /* this lane's x fragments of group u (word slots 4 WPL u + WPL c + i) for product  \
         column g: x row g (columns past MT repeat the last row) */                        \
      const int m_ = (g < MT) ? g : MT - 1;                                                \
      uint4 xf[WPL];                                                                       \
      KUNROLL for (int i = 0; i < WPL; ++i) xf[i] = xs[simd_id][m_][u * 4 * WPL + c * WPL + i]; \
      float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* per column: OFF (rows g), X (rows g + 8) */ \
      KUNROLL for (int i = 0; i < WPL; ++i) fold_sums<XK>(sums, xf[i], lane);              \
      KUNROLL for (int t = 0; t < RT; ++t) {                                               \
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                             \
        KUNROLL for (int i = 0; i < WPL; ++i) {                                            \
          fold_word<XK>(d, WV[t][0][u * WPL + i], WV[t][1][u * WPL + i], xf[i], lane);     \
        }                                                                                  \
        KUNROLL for (int r = 0; r < 2; ++r) {                                              \
          const float sc_ = fold_half<SXK>(SV[t][r][u / 2], u % 2);                        \
          const float bi_ = fold_half<SXK>(BV[t][r][u / 2], u % 2);                        \
          KUNROLL for (int h = 0; h < (MR == 1 ? 1 : 2); ++h) {                            \
            tot[t][r][h] = k_fma(sc_, d[2 * r + h] - sums[h],                              \
                                 k_fma(bi_, sums[2 + h], tot[t][r][h]));                   \
          }                                                                                \
        }                                                                                  \
      }                                                                                    \
    }

// The products of a step piece by piece (PIECES): column j holds the group of lanes c with
// c / WPL = j; the other lanes' k positions read the zero slot. Lane c then holds columns
// 2 c and 2 c + 1: groups NC p + 2 c + h where 2 c + h < NC.
#define FOLD_PIECES(WV, SV, BV)                                                            \
  KUNROLL for (int p = 0; p < 2; ++p) {                                                    \
    const bool mine_ = g == c / WPL;                                                       \
    uint4 xf[4];                                                                           \
    KUNROLL for (int j = 0; j < 4; ++j) xf[j] = xs[simd_id][0][mine_ ? 16 * p + 4 * c + j : 32]; \
    float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* per column: OFF (rows g), X (rows g + 8) */ \
    KUNROLL for (int j = 0; j < 4; ++j) fold_sums<XK>(sums, xf[j], lane);                  \
    KUNROLL for (int t = 0; t < RT; ++t) {                                                 \
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                               \
      KUNROLL for (int j = 0; j < 4; ++j) {                                                \
        fold_word<XK>(d, WV[t][0][4 * p + j], WV[t][1][4 * p + j], xf[j], lane);           \
      }                                                                                    \
      KUNROLL for (int r = 0; r < 2; ++r) {                                                \
        KUNROLL for (int h = 0; h < (NC == 1 ? 1 : 2); ++h) {                              \
          const int u0_ = NC * p + h, u1_ = (NC == 4) ? NC * p + 2 + h : u0_;              \
          const bool hi_ = NC == 4 && c == 1;                                              \
          const float sc_ = hi_ ? fold_half<SXK>(SV[t][r][u1_ / 2], u1_ % 2)               \
                                : fold_half<SXK>(SV[t][r][u0_ / 2], u0_ % 2);              \
          const float bi_ = hi_ ? fold_half<SXK>(BV[t][r][u1_ / 2], u1_ % 2)               \
                                : fold_half<SXK>(BV[t][r][u0_ / 2], u0_ % 2);              \
          if (2 * c + h < NC) {                                                            \
            tot[t][r][0] = k_fma(sc_, d[2 * r + h] - sums[h],                              \
                                 k_fma(bi_, sums[2 + h], tot[t][r][0]));                   \
          }                                                                                \
        }                                                                                  \
      }                                                                                    \
    }                                                                                      \
  }

// This lane's word slot of step s_ of every row of x into XR (more than one row: one register
// set, loaded a step ahead, so a step's staging does not wait on L2).
#define FOLD_LOAD_ROWS(s_, XR)                                                             \
  KUNROLL for (int m = 0; m < MR; ++m) {                                                   \
    if (m < MT) XR[m] = ((const KDEV uint4*)(x + size_t(m) * K + size_t(s_) * 256))[lane]; \
  }

// The products of step s_ from the buffers FOLD_LOAD filled (WV, SV, BV, XV, NV). With more
// than one row of x, each lane stages its word slot of every row from xr, then loads the
// slots of its next step (s_ + SK) into xr.
#define FOLD_STEP(s_, WV, SV, BV, XV, NV)                                                  \
  {                                                                                        \
    if (MR == 1) {                                                                         \
      xs[simd_id][0][lane] = NORM ? fold_x_norm_fragment<XK>(XV, NV, ssq[0])               \
                                  : fold_x_fragment<XK>(XV);                               \
    } else {                                                                               \
      KUNROLL for (int m = 0; m < MR; ++m) {                                               \
        if (m < MT) {                                                                      \
          xs[simd_id][m][lane] = NORM ? fold_x_norm_fragment<XK>(xr[m], NV, ssq[m])        \
                                      : fold_x_fragment<XK>(xr[m]);                        \
        }                                                                                  \
      }                                                                                    \
      if ((s_) + SK < STEPS) FOLD_LOAD_ROWS((s_) + SK, xr)                                 \
    }                                                                                      \
    k_simd_barrier();                                                                      \
    if (PIECES) {                                                                          \
      FOLD_PIECES(WV, SV, BV)                                                              \
    } else {                                                                               \
      FOLD_GROUPS(WV, SV, BV)                                                              \
    }                                                                                      \
    k_simd_barrier(); /* every lane has read the fragments before the next are staged */   \
  }

// PF = 1: two register sets in turn, the next step's loads in flight during this step's
// products (no copies between the sets); PF = 2: three sets, two steps in flight (more bytes in
// flight per simdgroup, more registers); PF = 0: each step loads, then computes, and other
// simdgroups cover the wait (fewer registers, more of them resident).
uint32_t wa[RT][2][8], sa[RT][2][SWR], ba[RT][2][SWR];
uint4 xa, na = k_uint4(0u, 0u, 0u, 0u);
int s = int(simd_id);
if (PIECES && lane == 0) xs[simd_id][0][32] = k_uint4(0u, 0u, 0u, 0u);  // PIECES' zero slot
uint4 xr[MR];  // more than one row: the rows' slots of this simdgroup's next step
if (MR > 1 && s < STEPS) FOLD_LOAD_ROWS(s, xr)
if (PF == 2) {
  uint32_t wb[RT][2][8], sb[RT][2][SWR], bb[RT][2][SWR];
  uint32_t wc[RT][2][8], sc3[RT][2][SWR], bc[RT][2][SWR];
  uint4 xb, nb = k_uint4(0u, 0u, 0u, 0u), xc, nc = k_uint4(0u, 0u, 0u, 0u);
  if (s < STEPS) FOLD_LOAD(s, wa, sa, ba, xa, na)
  if (s + SK < STEPS) FOLD_LOAD(s + SK, wb, sb, bb, xb, nb)
  for (; s < STEPS; s += 3 * SK) {
    if (s + 2 * SK < STEPS) FOLD_LOAD(s + 2 * SK, wc, sc3, bc, xc, nc)
    FOLD_STEP(s, wa, sa, ba, xa, na)
    if (s + SK >= STEPS) break;
    if (s + 3 * SK < STEPS) FOLD_LOAD(s + 3 * SK, wa, sa, ba, xa, na)
    FOLD_STEP(s + SK, wb, sb, bb, xb, nb)
    if (s + 2 * SK >= STEPS) break;
    if (s + 4 * SK < STEPS) FOLD_LOAD(s + 4 * SK, wb, sb, bb, xb, nb)
    FOLD_STEP(s + 2 * SK, wc, sc3, bc, xc, nc)
  }
} else if (PF == 1) {
  uint32_t wb[RT][2][8], sb[RT][2][SWR], bb[RT][2][SWR];
  uint4 xb, nb = k_uint4(0u, 0u, 0u, 0u);
  if (s < STEPS) FOLD_LOAD(s, wa, sa, ba, xa, na)
  for (; s < STEPS; s += 2 * SK) {
    if (s + SK < STEPS) FOLD_LOAD(s + SK, wb, sb, bb, xb, nb)
    FOLD_STEP(s, wa, sa, ba, xa, na)
    if (s + SK >= STEPS) break;
    if (s + 2 * SK < STEPS) FOLD_LOAD(s + 2 * SK, wa, sa, ba, xa, na)
    FOLD_STEP(s + SK, wb, sb, bb, xb, nb)
  }
} else {
  for (; s < STEPS; s += SK) {
    FOLD_LOAD(s, wa, sa, ba, xa, na)
    FOLD_STEP(s, wa, sa, ba, xa, na)
  }
}

if (PIECES && NC == 4) {  // lanes c = 0 and 1 hold the groups of columns 0-1 and 2-3
  KUNROLL for (int t = 0; t < RT; ++t) {
    KUNROLL for (int r = 0; r < 2; ++r) tot[t][r][0] += k_simd_xor(tot[t][r][0], 1u);
  }
}
// Split-K: each simdgroup's sums, by x row (the lanes of column 2 c + h hold x row 2 c + h;
// with one row only c = 0 does, the other columns repeat it)
KUNROLL for (int t = 0; t < RT; ++t) {
  KUNROLL for (int r = 0; r < 2; ++r) {
    KUNROLL for (int h = 0; h < 2; ++h) {
      const int m = 2 * c + h;
      if (m < MR) red[simd_id][m * 16 * RT + 16 * t + 8 * r + g] = tot[t][r][h];
    }
  }
}
if (NORM) {  // every k of every row passes through exactly one lane of this threadgroup
  KUNROLL for (int m = 0; m < MR; ++m) {
    const float v = k_simd_sum(ssq[m]);
    if (lane == 0) red[simd_id][RED + m] = v;
  }
}
KBARRIER();
for (int i = int(tid); i < TR * MT; i += 32 * SK) {
  const int m = i / TR, o = i - m * TR;  // x row, output row in the threadgroup
  float v = 0.0f, u = 0.0f;
  KUNROLL for (int k = 0; k < SK; ++k) v += red[k][m * 16 * RT + o];
  if (GATED) {
    KUNROLL for (int k = 0; k < SK; ++k) u += red[k][m * 16 * RT + 16 + o];
  }
  if (NORM) {
    float s2 = 0.0f;
    KUNROLL for (int k = 0; k < SK; ++k) s2 += red[k][RED + m];
    const float inv = k_rsqrt(s2 / float(K) + QEPS);
    v *= inv;
    u *= inv;
  }
  if (GATED) v = k_silu(v) * u;  // silu(gate) * up
  if (n0 + o < N) {
    if (RES) v += float(QRES[size_t(m) * N + n0 + o]);
    y[size_t(m) * N + n0 + o] = static_cast<T>(v);
  }
}
