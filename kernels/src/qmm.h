// qmm: y[m, n] = sum_k x[m, k] * (scales[n, g] * q[n, k] + biases[n, g]) for small M (up to 64
// rows: batched decode, short prefill chunks) on tensor cores, weights in MLX's affine layout.
//
// Work: a threadgroup owns TN = 8 * NT output columns (weight rows); its SK simdgroups split K
// in steps of 128 and meet in threadgroup memory. In a step, lane 4 g + c reads the 32 codes of
// chunk c (k = 128 s + 32 c ...) of weight rows n0 + 8 t + g (one 16-byte load per row at
// 4 bits), dequantizes them in registers and feeds them to m16n8k16 multiply-accumulates as the
// B fragment (column g), with the x rows g and g + 8 of every 16-row tile of M as A fragments.
//
// No repacking of MLX's layout: the order of k inside a product does not matter as long as A
// and B agree, so each lane gives the fragment's k slots {2c, 2c+1, 2c+8, 2c+9} its own codes,
// in the order cheapest to decode, and gathers the matching x values from its own 16-byte
// loads. For 2/4 bits (and 8 bits with float16 x), a code pair (j, j + 16 / BITS) of a word
// masked in place and OR-ed into the exponent of 1024 (float16) or 128 (bfloat16) is exact, and
// one subtraction and one FMA in 16-bit pair arithmetic give two weights (k_dq_pair). Other
// bits decode through K_AFFINE_CODE in float.
//
// Template constants: T (x and y), S (scales, biases), XK (1 float16, 2 bfloat16), BITS, GS,
// NT, SK, MTILES (16-row tiles of x, 1 to 4), K, N. The number of rows of x, MT, is read at
// run time from `rows` (a batch of any size up to 16 * MTILES reuses one compiled kernel).
//// INCLUDE quant_common.h
//// BODY
constexpr int KW = K * BITS / 32;      // words per weight row
constexpr int NG = K / GS;             // groups per row
constexpr int CH = K / 32;             // 32-value chunks per row
constexpr int STEPS = (CH + 3) / 4;    // 128-value steps (four lanes, a chunk each)
constexpr bool FAST = (BITS == 2 || BITS == 4 || BITS == 8);
constexpr uint32_t MASK = (1u << BITS) - 1u;
constexpr float CENTER = float(1 << (BITS - 1));
constexpr bool MAGIC = (BITS == 2 || BITS == 4 || (BITS == 8 && XK == 1));
constexpr int PW = 16 / BITS;  // MAGIC: codes j and j + PW of a word sit in its two 16-bit halves
constexpr uint32_t MAGIC_BITS = (XK == 1) ? 0x64006400u : 0x43004300u;
constexpr int TN = 8 * NT;
const int MT = rows[0];

const int g = int(lane) >> 2;
const int c = int(lane) & 3;
const int n0 = int(tg_x) * TN;

float acc[MTILES][NT][4];
KUNROLL for (int mt = 0; mt < MTILES; ++mt) {
  KUNROLL for (int t = 0; t < NT; ++t) {
    KUNROLL for (int i = 0; i < 4; ++i) acc[mt][t][i] = 0.0f;
  }
}

// Pair p (0..7) of a 16-value half chunk: the offsets of its low and high value.
#define QMM_LO(p) (MAGIC ? 2 * PW * ((p) / PW) + (p) % PW : 2 * (p))
#define QMM_HI(p) (QMM_LO(p) + (MAGIC ? PW : 1))
// x values at offsets QMM_LO(p), QMM_HI(p) of a half chunk X (8 words) as one pair
#define QMM_XPAIR(X, p)                                                                    \
  (MAGIC ? (((X)[QMM_LO(p) >> 1] >> (16 * (QMM_LO(p) & 1))) & 0xFFFFu) |                    \
               (((X)[QMM_HI(p) >> 1] >> (16 * (QMM_HI(p) & 1))) << 16)                      \
         : (X)[p])

// Codes, scale and bias of this lane's chunk of step s_ for its NT weight rows (rows past N
// clamp to N - 1, chunks past K to the last one with zero scale and bias: valid loads, no effect).
#define QMM_LOAD(s_, WV, SC, BC)                                                           \
  {                                                                                        \
    const int ch_ = 4 * (s_) + c;                                                          \
    const int chc_ = (ch_ < CH) ? ch_ : (CH - 1);                                          \
    KUNROLL for (int t = 0; t < NT; ++t) {                                                 \
      const int row_ = (n0 + 8 * t + g < N) ? (n0 + 8 * t + g) : (N - 1);                 \
      const KDEV uint32_t* wp_ = w + size_t(row_) * KW + size_t(chc_) * BITS;              \
      K_LOAD_CODES(WV[t], wp_)                                                             \
      const size_t gi_ = size_t(row_) * NG + (chc_ * 32) / GS;                             \
      SC[t] = (ch_ < CH) ? float(scales[gi_]) : 0.0f;                                      \
      BC[t] = (ch_ < CH) ? float(biases[gi_]) : 0.0f;                                      \
    }                                                                                      \
  }

uint32_t nwv[NT][BITS];
float nsc[NT], nbc[NT];
int s = int(simd_id);
if (s < STEPS) QMM_LOAD(s, nwv, nsc, nbc)
for (; s < STEPS; s += SK) {
  uint32_t wv[NT][BITS];
  uint32_t s2[NT], b2[NT];   // MAGIC: scale and bias as 16-bit pairs
  float sc[NT], bc[NT];      // otherwise: scale, and bias + CENTER * scale for centred codes
  KUNROLL for (int t = 0; t < NT; ++t) {
    KUNROLL for (int i = 0; i < BITS; ++i) wv[t][i] = nwv[t][i];
    sc[t] = nsc[t];
    bc[t] = MAGIC ? nbc[t] : nbc[t] + CENTER * nsc[t];
    s2[t] = k_pack16x2<XK>(sc[t], sc[t]);
    b2[t] = k_pack16x2<XK>(bc[t], bc[t]);
  }
  if (s + SK < STEPS) QMM_LOAD(s + SK, nwv, nsc, nbc)  // next step's loads in flight
  const int ch = (4 * s + c < CH) ? (4 * s + c) : (CH - 1);

  KUNROLL for (int h = 0; h < 2; ++h) {
    // x rows g and g + 8 of every 16-row tile, 16 values each (two 16-byte loads per row)
    uint32_t xw[MTILES][2][8];
    KUNROLL for (int mt = 0; mt < MTILES; ++mt) {
      KUNROLL for (int hh = 0; hh < 2; ++hh) {
        const int r = (16 * mt + 8 * hh + g < MT) ? (16 * mt + 8 * hh + g) : (MT - 1);
        const KDEV uint4* xp = (const KDEV uint4*)(x + size_t(r) * K + size_t(ch) * 32 + 16 * h);
        const uint4 v0 = xp[0];
        const uint4 v1 = xp[1];
        xw[mt][hh][0] = v0.x; xw[mt][hh][1] = v0.y; xw[mt][hh][2] = v0.z; xw[mt][hh][3] = v0.w;
        xw[mt][hh][4] = v1.x; xw[mt][hh][5] = v1.y; xw[mt][hh][6] = v1.z; xw[mt][hh][7] = v1.w;
      }
    }
    KUNROLL for (int kk = 0; kk < 4; ++kk) {  // four k16 products per half chunk
      uint32_t bf[NT][2];
      KUNROLL for (int t = 0; t < NT; ++t) {
        KUNROLL for (int i = 0; i < 2; ++i) {
          const int p = 2 * kk + i;
          if (MAGIC) {
            const int wi = h * (BITS / 2) + p / PW;  // (clamped: dead code for other bits)
            const uint32_t word = wv[t][(wi < BITS) ? wi : BITS - 1];
            const uint32_t m = ((word >> (BITS * (p % PW))) & (MASK | (MASK << 16))) | MAGIC_BITS;
            bf[t][i] = k_dq_pair<XK>(m, s2[t], b2[t]);
          } else {
            float q0, q1;
            K_AFFINE_CODE(q0, wv[t], 16 * h + 2 * p)
            K_AFFINE_CODE(q1, wv[t], 16 * h + 2 * p + 1)
            bf[t][i] = k_pack16x2<XK>(k_fma(sc[t], q0, bc[t]), k_fma(sc[t], q1, bc[t]));
          }
        }
      }
      KUNROLL for (int mt = 0; mt < MTILES; ++mt) {
        const uint32_t af[4] = {QMM_XPAIR(xw[mt][0], 2 * kk), QMM_XPAIR(xw[mt][1], 2 * kk),
                                QMM_XPAIR(xw[mt][0], 2 * kk + 1), QMM_XPAIR(xw[mt][1], 2 * kk + 1)};
        KUNROLL for (int t = 0; t < NT; ++t) k_mma16816<XK>(acc[mt][t], af, bf[t], lane);
      }
    }
  }
}

// Split-K: every simdgroup's tile to threadgroup memory, then one sum per output.
KSHARED float red[SK][MTILES * 16][TN];
KUNROLL for (int mt = 0; mt < MTILES; ++mt) {
  KUNROLL for (int t = 0; t < NT; ++t) {
    red[simd_id][16 * mt + g][8 * t + 2 * c] = acc[mt][t][0];
    red[simd_id][16 * mt + g][8 * t + 2 * c + 1] = acc[mt][t][1];
    red[simd_id][16 * mt + g + 8][8 * t + 2 * c] = acc[mt][t][2];
    red[simd_id][16 * mt + g + 8][8 * t + 2 * c + 1] = acc[mt][t][3];
  }
}
KBARRIER();
for (int i = int(tid); i < MT * TN; i += 32 * SK) {
  const int m = i / TN;
  const int col = i % TN;
  float v = 0.0f;
  KUNROLL for (int k = 0; k < SK; ++k) v += red[k][m][col];
  if (n0 + col < N) y[size_t(m) * N + n0 + col] = static_cast<T>(v);
}
