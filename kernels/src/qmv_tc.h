// qmv_tc: y[m, n] = sum_k x[m, k] * (scales[n, g] * q[n, k] + biases[n, g]) for up to 8 rows of
// x (decode) on tensor cores, weights in MLX's affine layout.
//
// Why: the float-FMA GEMV (qmv_core.h) spends ~5.8 instructions per weight. Here the weights
// are the A operand of m16n8k16 products (16 weight rows x 16 k) and the rows of x the B
// operand's columns: per two weights one mask, one subtraction and one FMA in 16-bit pair
// arithmetic (k_dq_pair), one product per 8 weights of a lane, for every row of x at once
// (Marlin's decode design, on MLX's layout without repacking). Status on the H200
// (KERNEL_NOTES "Session 12"): 2-8 rows cost what one row costs, but one row runs level with
// the float body, so launches take this body only when asked (qmv.USE_TC).
//
// Work: a threadgroup owns TR = 16 * RT weight rows; its SK simdgroups split K in steps of
// 128 U and meet in threadgroup memory. In a step, lane 4 g + c reads the 32 codes of each of
// chunks U c .. U c + U - 1 of rows g and g + 8 of each 16-row tile (one 16-byte load per row
// and chunk at 4 bits), and x row g (the product's column g; rows past MT are zero) at the
// same k. The order of k inside a product is free as long as A and B agree, so each lane gives
// its fragment slots {2c, 2c+1, 2c+8, 2c+9} code pairs (j, j + 16 / BITS) of a word, which
// share the word's two 16-bit halves, and builds the matching x pairs from its own loads.
// Needs 16-bit x and 2/4 bits (8 bits with float16). The loads either run one step ahead in
// registers (PIPE = 0) or PIPE - 1 steps ahead through asynchronous copies (PIPE > 0, below).
//
// Template constants: T (x and y), S (scales, biases), XK (1 float16, 2 bfloat16), BITS, GS,
// RT, SK, U (chunks per lane and step), PIPE (stages of the asynchronous copies; 0: the
// next step's loads in registers), MT (rows of x, 1 to 8), K, N.
//// INCLUDE quant_common.h
//// BODY
constexpr int KW = K * BITS / 32;   // words per weight row
constexpr int NG = K / GS;          // groups per row
constexpr int CH = K / 32;          // 32-value chunks per row
constexpr int STEPS = (CH + 4 * U - 1) / (4 * U);  // steps of 128 U (4 lanes, U chunks each)
constexpr uint32_t MASK = (1u << BITS) - 1u;
constexpr int PW = 16 / BITS;       // codes j and j + PW of a word sit in its two 16-bit halves
constexpr uint32_t MAGIC_BITS = (XK == 1) ? 0x64006400u : 0x43004300u;
constexpr int TR = 16 * RT;

const int g = int(lane) >> 2;
const int c = int(lane) & 3;
const int n0 = int(tg_x) * TR;

float acc[RT][4];
KUNROLL for (int t = 0; t < RT; ++t) {
  KUNROLL for (int i = 0; i < 4; ++i) acc[t][i] = 0.0f;
}

// Pair q (0..15) of a 32-value chunk: its low value's offset; the high one is PW further.
#define QTC_LO(q) (2 * PW * ((q) / PW) + (q) % PW)
// x values at offsets QTC_LO(q) and QTC_LO(q) + PW of a chunk X (16 words) as one pair
#define QTC_XPAIR(X, q)                                                                    \
  ((((X)[QTC_LO(q) >> 1] >> (16 * (QTC_LO(q) & 1))) & 0xFFFFu) |                           \
   (((X)[(QTC_LO(q) + PW) >> 1] >> (16 * ((QTC_LO(q) + PW) & 1))) << 16))
// The two weights of pair q of row slot r (row n0 + 8 r + g), dequantized as a 16-bit pair
#define QTC_W(r, q)                                                                        \
  k_dq_pair<XK>(((wv[r][(q) / PW] >> (BITS * ((q) % PW))) & (MASK | (MASK << 16))) |      \
                    MAGIC_BITS, s2[r], b2[r])

// The eight k16 products of one chunk (16 pairs) from wv, s2, b2 and xw, for every row tile
#define QTC_PRODUCTS()                                                                     \
  KUNROLL for (int i = 0; i < 8; ++i) {                                                    \
    const uint32_t bf[2] = {QTC_XPAIR(xw, 2 * i), QTC_XPAIR(xw, 2 * i + 1)};               \
    KUNROLL for (int t = 0; t < RT; ++t) {                                                 \
      const uint32_t af[4] = {QTC_W(2 * t, 2 * i), QTC_W(2 * t + 1, 2 * i),                \
                              QTC_W(2 * t, 2 * i + 1), QTC_W(2 * t + 1, 2 * i + 1)};       \
      k_mma16816<XK>(acc[t], af, bf, lane);                                                \
    }                                                                                      \
  }

// Codes, scale and bias of this lane's U chunks of step s_ for its 2 RT row slots (slot r is
// row n0 + 8 r + g; the four lanes of a row read 64 U contiguous bytes at 4 bits; rows past N
// clamp to N - 1, chunks past K to the last one with zero scale and bias: valid loads, no
// effect).
#define QTC_LOAD(s_, WV, SC, BC)                                                           \
  {                                                                                        \
    KUNROLL for (int u = 0; u < U; ++u) {                                                  \
      const int ch_ = 4 * U * (s_) + U * c + u;                                            \
      const int chc_ = (ch_ < CH) ? ch_ : (CH - 1);                                        \
      KUNROLL for (int r = 0; r < 2 * RT; ++r) {                                           \
        const int row_ = (n0 + 8 * r + g < N) ? (n0 + 8 * r + g) : (N - 1);                \
        K_LOAD_CODES(WV[r][u], w + size_t(row_) * KW + size_t(chc_) * BITS)                \
        const size_t gi_ = size_t(row_) * NG + (chc_ * 32) / GS;                           \
        SC[r][u] = (ch_ < CH) ? float(scales[gi_]) : 0.0f;                                 \
        BC[r][u] = (ch_ < CH) ? float(biases[gi_]) : 0.0f;                                 \
      }                                                                                    \
    }                                                                                      \
  }

// PIPE > 0: each simdgroup stages its steps through threadgroup memory with asynchronous
// copies, PIPE - 1 steps ahead of the products (no registers held by the loads in flight).
// A stage holds the step's 16 RT weight rows (U * BITS 16-byte pieces each, plus one piece of
// padding so that the eight rows of a fragment load fall in different banks), their scales and
// biases (SW words per row) and the MT rows of x (16 U pieces each, plus one).
constexpr int PST = (PIPE > 0) ? PIPE : 1;
constexpr int WROW = U * BITS + 1;
constexpr int SW = (PIPE > 0) ? int((128 * U / GS) * sizeof(S)) / 4 : 1;  // scale words per row
constexpr int XROW = 16 * U + 1;
KSHARED uint4 wst[SK][PST][(PIPE > 0) ? 16 * RT * WROW : 1];
KSHARED uint4 xst[SK][PST][(PIPE > 0) ? MT * XROW : 1];
KSHARED uint32_t sst[SK][PST][(PIPE > 0) ? 2 * 16 * RT * SW : 1];

// Issue the copies of step s_ into stage buffer b_ (pieces past the row end, groups past NG and
// x past K are zero-filled: zero scale and bias make those weights 0, and 0 * 0 adds nothing).
#define QTC_ISSUE(s_, b_)                                                                  \
  {                                                                                        \
    const int c0_ = 4 * U * (s_);                                                          \
    for (int p_ = int(lane); p_ < 16 * RT * U * BITS; p_ += 32) {                          \
      const int rr_ = p_ / (U * BITS), col_ = p_ % (U * BITS);                             \
      const int row_ = (n0 + rr_ < N) ? (n0 + rr_) : (N - 1);                              \
      const bool ok_ = c0_ * BITS + 4 * col_ + 4 <= KW;                                    \
      k_cp16(&wst[simd_id][b_][rr_ * WROW + col_],                                         \
             w + size_t(row_) * KW + size_t(ok_ ? c0_ * BITS + 4 * col_ : 0), ok_);        \
    }                                                                                      \
    const int g0_ = (c0_ * 32) / GS;                                                       \
    for (int p_ = int(lane); p_ < 16 * RT * SW; p_ += 32) {                                \
      const int rr_ = p_ / SW, wd_ = p_ % SW;                                              \
      const int row_ = (n0 + rr_ < N) ? (n0 + rr_) : (N - 1);                              \
      const bool ok_ = int(g0_ * sizeof(S)) + 4 * wd_ + 4 <= int(NG * sizeof(S));          \
      const size_t o_ = ok_ ? size_t(row_) * NG + g0_ : 0;                                 \
      k_cp4(&sst[simd_id][b_][rr_ * SW + wd_],                                             \
            (const KDEV uint32_t*)(scales + o_) + (ok_ ? wd_ : 0), ok_);                   \
      k_cp4(&sst[simd_id][b_][(16 * RT + rr_) * SW + wd_],                                 \
            (const KDEV uint32_t*)(biases + o_) + (ok_ ? wd_ : 0), ok_);                   \
    }                                                                                      \
    for (int p_ = int(lane); p_ < MT * 16 * U; p_ += 32) {                                 \
      const int m_ = p_ / (16 * U), col_ = p_ % (16 * U);                                  \
      const bool ok_ = c0_ + col_ / 4 < CH;                                                \
      k_cp16(&xst[simd_id][b_][m_ * XROW + col_],                                          \
             x + (ok_ ? size_t(m_) * K + size_t(c0_) * 32 + 8 * col_ : size_t(0)), ok_);   \
    }                                                                                      \
    k_cp_commit();                                                                         \
  }

if (PIPE > 0) {
  const int nst = (STEPS - int(simd_id) + SK - 1) / SK;  // steps of this simdgroup
  KUNROLL for (int i = 0; i < PST - 1; ++i) {
    if (i < nst) QTC_ISSUE(int(simd_id) + i * SK, i) else k_cp_commit();
  }
  for (int i = 0; i < nst; ++i) {
    const int bn = (i + PST - 1) % PST;
    if (i + PST - 1 < nst) QTC_ISSUE(int(simd_id) + (i + PST - 1) * SK, bn) else k_cp_commit();
    k_cp_wait<PST - 1>();
    k_simd_barrier();  // every lane's copies of step i have landed
    const int b = i % PST;
    const KTG S* ssc = (const KTG S*)&sst[simd_id][b][0];
    const KTG S* sbi = (const KTG S*)&sst[simd_id][b][16 * RT * SW];
    KUNROLL for (int u = 0; u < U; ++u) {
      const int cl = U * c + u;  // this lane's chunk within the step
      uint32_t wv[2 * RT][BITS];
      uint32_t s2[2 * RT], b2[2 * RT];
      KUNROLL for (int r = 0; r < 2 * RT; ++r) {
        const KTG uint32_t* wp = (const KTG uint32_t*)&wst[simd_id][b][(8 * r + g) * WROW];
        if (BITS % 4 == 0) {
          KUNROLL for (int j = 0; j < BITS / 4; ++j) {
            const uint4 v = ((const KTG uint4*)wp)[cl * (BITS / 4) + j];
            wv[r][4 * j] = v.x; wv[r][4 * j + 1] = v.y;
            wv[r][4 * j + 2] = v.z; wv[r][4 * j + 3] = v.w;
          }
        } else {
          KUNROLL for (int j = 0; j < BITS; ++j) wv[r][j] = wp[cl * BITS + j];
        }
        const int gi = (8 * r + g) * (SW * 4 / int(sizeof(S))) + (cl * 32) / GS;
        const float sv = float(ssc[gi]);
        const float bv = float(sbi[gi]);
        s2[r] = k_pack16x2<XK>(sv, sv);
        b2[r] = k_pack16x2<XK>(bv, bv);
      }
      uint32_t xw[16];  // x row g at this chunk's 32 k (zero past MT)
      if (g < MT) {
        KUNROLL for (int j = 0; j < 4; ++j) {
          const uint4 v = xst[simd_id][b][g * XROW + 4 * cl + j];
          xw[4 * j] = v.x; xw[4 * j + 1] = v.y; xw[4 * j + 2] = v.z; xw[4 * j + 3] = v.w;
        }
      } else {
        KUNROLL for (int j = 0; j < 16; ++j) xw[j] = 0u;
      }
      QTC_PRODUCTS()
    }
    k_simd_barrier();  // stage b is read out before a later step's copies land in it
  }
} else {
uint32_t nwv[2 * RT][U][BITS];
  float nsc[2 * RT][U], nbc[2 * RT][U];
  int s = int(simd_id);
  if (s < STEPS) QTC_LOAD(s, nwv, nsc, nbc)
  for (; s < STEPS; s += SK) {
    uint32_t wq[2 * RT][U][BITS];
    float sq[2 * RT][U], bq[2 * RT][U];
    KUNROLL for (int r = 0; r < 2 * RT; ++r) {
      KUNROLL for (int u = 0; u < U; ++u) {
        KUNROLL for (int i = 0; i < BITS; ++i) wq[r][u][i] = nwv[r][u][i];
        sq[r][u] = nsc[r][u];
        bq[r][u] = nbc[r][u];
      }
    }
    if (s + SK < STEPS) QTC_LOAD(s + SK, nwv, nsc, nbc)  // next step's loads in flight
    KUNROLL for (int u = 0; u < U; ++u) {
      const int ch0 = 4 * U * s + U * c + u;
      const int ch = (ch0 < CH) ? ch0 : (CH - 1);
      uint32_t wv[2 * RT][BITS];
      uint32_t s2[2 * RT], b2[2 * RT];
      KUNROLL for (int r = 0; r < 2 * RT; ++r) {
        KUNROLL for (int i = 0; i < BITS; ++i) wv[r][i] = wq[r][u][i];
        s2[r] = k_pack16x2<XK>(sq[r][u], sq[r][u]);
        b2[r] = k_pack16x2<XK>(bq[r][u], bq[r][u]);
      }
      uint32_t xw[16];  // x row g at this chunk's 32 k (zero past MT)
      if (g < MT) {
        const KDEV uint4* xp = (const KDEV uint4*)(x + size_t(g) * K + size_t(ch) * 32);
        KUNROLL for (int i = 0; i < 4; ++i) {
          const uint4 v = xp[i];
          xw[4 * i] = v.x; xw[4 * i + 1] = v.y; xw[4 * i + 2] = v.z; xw[4 * i + 3] = v.w;
        }
      } else {
        KUNROLL for (int i = 0; i < 16; ++i) xw[i] = 0u;
      }
      QTC_PRODUCTS()
    }
  }
}

// Split-K: every simdgroup's columns below MT to threadgroup memory, then one sum per output.
KSHARED float red[SK][TR][8];
KUNROLL for (int t = 0; t < RT; ++t) {
  red[simd_id][16 * t + g][2 * c] = acc[t][0];
  red[simd_id][16 * t + g][2 * c + 1] = acc[t][1];
  red[simd_id][16 * t + g + 8][2 * c] = acc[t][2];
  red[simd_id][16 * t + g + 8][2 * c + 1] = acc[t][3];
}
KBARRIER();
for (int i = int(tid); i < TR * MT; i += 32 * SK) {
  const int r = i / MT;
  const int m = i % MT;
  float v = 0.0f;
  KUNROLL for (int k = 0; k < SK; ++k) v += red[k][r][m];
  if (n0 + r < N) y[size_t(m) * N + n0 + r] = static_cast<T>(v);
}
