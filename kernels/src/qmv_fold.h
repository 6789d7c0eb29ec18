// qmv_fold: y[n] = sum_k x[k] * (scales[n, g] * q[n, k] + biases[n, g]) for one row of x
// (decode), 4-bit codes in MLX's affine layout, on m16n8k16 tensor cores with the affine
// dequantization folded into one float epilogue per group.
//
// Why: the decode GEMV ran at 1.7-2x the time of a plain read of its bytes because it issued
// 4.3-5.8 instructions per weight (KERNEL_NOTES "Session 12"). Here a code goes into the
// products as its magic-number value (1024 + q as float16, 128 + q as bfloat16: one mask-or for
// two codes, no subtraction, no scale FMA in 16-bit), and each group's products land in a fresh
// float accumulator D. The group's affine step is then done once per row in float:
//   sum_k x w = s * (D - OFF) + b * X,   OFF = base * sum_k x,  X = sum_k x,
// where OFF and X come from one more product per 16 k with a constant A (shared by all rows).
// float16 takes the odd codes of a word at 16 q (mask 0x00F000F0, no shift) and meets them with
// x / 16, which is exact; bfloat16 has too few mantissa bits for that and shifts instead.
//
// Work: a threadgroup owns TR = 16 * RT weight rows; SK simdgroups split K in steps of 256.
// In a step, lane L of the simdgroup stages word slot L (8 values of x) in fragment order in
// threadgroup memory; lane 4 g + c then takes, for every group of the step, WPL = GS / 32
// consecutive code words of rows g and g + 8 of each row tile (one load per row and group), so
// the 16 k of each product sit in one group. With PF the next step's codes, scales, biases and
// x are loaded into registers before this step's products (kept raw: nothing waits on them).
// Needs K % 256 == 0, 16-bit x and 16-bit scales (qmv.fold_supported).
//
// Template constants: T (x and y), S (scales, biases), XK (x kind: 1 float16, 2 bfloat16),
// SXK (scale kind, same codes), GS (32, 64, 128), RT, SK, PF (register prefetch), K, N.
//// INCLUDE quant_common.h

// The four 16-bit pairs a code word gives the products, in the order the x fragments use:
// p[0] = codes (0, 4), p[1] = (1, 5), p[2] = (2, 6), p[3] = (3, 7), each as base + code
// (float16: p[1] and p[3] as base + 16 code, met by x / 16).
template <int XK>
KINLINE void fold_pairs(uint32_t v, KTHREAD uint32_t* p) {
  const uint32_t lo = 0x000F000Fu;
  if (XK == 1) {
    const uint32_t v8 = v >> 8, hi = 0x00F000F0u, base = 0x64006400u;
    p[0] = k_and_or(v, lo, base);
    p[1] = k_and_or(v, hi, base);
    p[2] = k_and_or(v8, lo, base);
    p[3] = k_and_or(v8, hi, base);
  } else {
    const uint32_t base = 0x43004300u;
    p[0] = k_and_or(v, lo, base);
    p[1] = k_and_or(v >> 4, lo, base);
    p[2] = k_and_or(v >> 8, lo, base);
    p[3] = k_and_or(v >> 12, lo, base);
  }
}

// Eight consecutive x values (one 16-byte load) as the four fragment pairs matching fold_pairs.
template <int XK>
KINLINE uint4 fold_x_fragment(uint4 v) {
  const uint32_t f0 = (v.x & 0xFFFFu) | (v.z << 16);
  uint32_t f1 = (v.x >> 16) | (v.z & 0xFFFF0000u);
  const uint32_t f2 = (v.y & 0xFFFFu) | (v.w << 16);
  uint32_t f3 = (v.y >> 16) | (v.w & 0xFFFF0000u);
  if (XK == 1) {  // x / 16 for the codes taken at 16 q (a power of two: exact)
    const float2 a = k_f16x2(f1), b = k_f16x2(f3);
    f1 = k_pack_f16x2(a.x * 0.0625f, a.y * 0.0625f);
    f3 = k_pack_f16x2(b.x * 0.0625f, b.y * 0.0625f);
  }
  return k_uint4(f0, f1, f2, f3);
}

// One 16-bit value (low or high half of a word) of kind K16 as float.
template <int K16>
KINLINE float fold_half(uint32_t w, int hi) {
  if (K16 == 2) return k_as_float(hi ? (w & 0xFFFF0000u) : (w << 16));
  const float2 f = k_f16x2(w);
  return hi ? f.y : f.x;
}
//// BODY
constexpr int KW = K / 8;            // code words per weight row
constexpr int NG = K / GS;           // groups per row
constexpr int U = 256 / GS;          // groups per step
constexpr int WPL = GS / 32;         // code words per lane, row and group
constexpr int SWR = U / 2;           // words of scales (or biases) per row and step
constexpr int STEPS = K / 256;
constexpr int TR = 16 * RT;
// The constant A of the sums product: rows g give OFF (base times the fragment values, which
// for float16 hold x / 16 where the codes were taken at 16 q), rows g + 8 give X.
constexpr uint32_t A_OFF = (XK == 1) ? 0x64006400u : 0x43004300u;  // 1024 or 128
constexpr uint32_t A_X0 = (XK == 1) ? 0x3C003C00u : 0x3F803F80u;   // 1
constexpr uint32_t A_X1 = (XK == 1) ? 0x4C004C00u : 0x3F803F80u;   // 16 (float16) or 1

const int g = int(lane) >> 2;
const int c = int(lane) & 3;
const int n0 = int(tg_x) * TR;

KSHARED uint4 xs[SK][32];  // each simdgroup's step of x, word slot by word slot
KSHARED float red[SK][TR];

float tot[RT][2];
KUNROLL for (int t = 0; t < RT; ++t) { tot[t][0] = 0.0f; tot[t][1] = 0.0f; }

// Loads of step s_: WV[t][r][u][j] code words, SV / BV[t][r][i] scale / bias words, XV this
// lane's 8 values of x (rows past N read row N - 1 and are not written).
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

// Loads of step s_: WV[t][r][u][j] code words, SV / BV[t][r][i] scale / bias words, XV this
// lane's 8 values of x (rows past N read row N - 1 and are not written).
#define FOLD_LOAD(s_, WV, SV, BV, XV)                                                      \
  {                                                                                        \
    KUNROLL for (int t = 0; t < RT; ++t) {                                                 \
      KUNROLL for (int r = 0; r < 2; ++r) {                                                \
        const int row_ = (n0 + 16 * t + 8 * r + g < N) ? (n0 + 16 * t + 8 * r + g) : (N - 1); \
        const KDEV uint32_t* wp_ = w + size_t(row_) * KW + size_t(s_) * 32 + c * WPL;     \
        KUNROLL for (int u = 0; u < U; ++u) { FOLD_WORDS(WPL, WV[t][r][u], wp_ + u * 4 * WPL) } \
        const size_t so_ = size_t(row_) * NG + size_t(s_) * U;                             \
        FOLD_WORDS(SWR, SV[t][r], (const KDEV uint32_t*)(scales + so_))                    \
        FOLD_WORDS(SWR, BV[t][r], (const KDEV uint32_t*)(biases + so_))                    \
      }                                                                                    \
    }                                                                                      \
    XV = ((const KDEV uint4*)(x + size_t(s_) * 256))[lane];                                \
  }

// The products of one step from buffers WV, SV, BV, XV (loaded by FOLD_LOAD)
#define FOLD_STEP(WV, SV, BV, XV)                                                          \
  {                                                                                        \
    xs[simd_id][lane] = fold_x_fragment<XK>(XV);                                           \
    k_simd_barrier();                                                                      \
    KUNROLL for (int u = 0; u < U; ++u) {                                                  \
      uint4 xf[WPL]; /* this lane's x fragments of group u: word slots 4 WPL u + WPL c + j */ \
      KUNROLL for (int j = 0; j < WPL; ++j) xf[j] = xs[simd_id][u * 4 * WPL + c * WPL + j]; \
      float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* OFF (rows g) and X (rows g + 8) */      \
      KUNROLL for (int j = 0; j < WPL; ++j) {                                              \
        const uint32_t a_[4] = {A_OFF, A_X0, A_OFF, A_X1};                                 \
        const uint32_t b0_[2] = {xf[j].x, xf[j].y}, b1_[2] = {xf[j].z, xf[j].w};           \
        k_mma16816<XK>(sums, a_, b0_, lane);                                               \
        k_mma16816<XK>(sums, a_, b1_, lane);                                               \
      }                                                                                    \
      KUNROLL for (int t = 0; t < RT; ++t) {                                               \
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};                                             \
        KUNROLL for (int j = 0; j < WPL; ++j) {                                            \
          uint32_t pg[4], ph[4];                                                           \
          fold_pairs<XK>(WV[t][0][u][j], pg);                                              \
          fold_pairs<XK>(WV[t][1][u][j], ph);                                              \
          const uint32_t a0_[4] = {pg[0], ph[0], pg[1], ph[1]};                            \
          const uint32_t a1_[4] = {pg[2], ph[2], pg[3], ph[3]};                            \
          const uint32_t b0_[2] = {xf[j].x, xf[j].y}, b1_[2] = {xf[j].z, xf[j].w};         \
          k_mma16816<XK>(d, a0_, b0_, lane);                                               \
          k_mma16816<XK>(d, a1_, b1_, lane);                                               \
        }                                                                                  \
        KUNROLL for (int r = 0; r < 2; ++r) {                                              \
          const float sc_ = fold_half<SXK>(SV[t][r][u / 2], u % 2);                        \
          const float bi_ = fold_half<SXK>(BV[t][r][u / 2], u % 2);                        \
          tot[t][r] = k_fma(sc_, d[2 * r] - sums[0], k_fma(bi_, sums[2], tot[t][r]));      \
        }                                                                                  \
      }                                                                                    \
    }                                                                                      \
    k_simd_barrier(); /* every lane has read the fragments before the next are staged */   \
  }

// PF = 1: two register sets in turn, the next step's loads in flight during this step's
// products (no copies between the sets); PF = 0: each step loads, then computes, and other
// simdgroups cover the wait (fewer registers, more of them resident).
uint32_t wa[RT][2][U][WPL], sa[RT][2][SWR], ba[RT][2][SWR];
uint4 xa;
int s = int(simd_id);
if (PF) {
  uint32_t wb[RT][2][U][WPL], sb[RT][2][SWR], bb[RT][2][SWR];
  uint4 xb;
  if (s < STEPS) FOLD_LOAD(s, wa, sa, ba, xa)
  for (; s < STEPS; s += 2 * SK) {
    if (s + SK < STEPS) FOLD_LOAD(s + SK, wb, sb, bb, xb)
    FOLD_STEP(wa, sa, ba, xa)
    if (s + SK >= STEPS) break;
    if (s + 2 * SK < STEPS) FOLD_LOAD(s + 2 * SK, wa, sa, ba, xa)
    FOLD_STEP(wb, sb, bb, xb)
  }
} else {
  for (; s < STEPS; s += SK) {
    FOLD_LOAD(s, wa, sa, ba, xa)
    FOLD_STEP(wa, sa, ba, xa)
  }
}

// Split-K: each simdgroup's row sums (lanes c = 0 hold them; the other columns repeat them)
if (c == 0) {
  KUNROLL for (int t = 0; t < RT; ++t) {
    red[simd_id][16 * t + g] = tot[t][0];
    red[simd_id][16 * t + g + 8] = tot[t][1];
  }
}
KBARRIER();
for (int i = int(tid); i < TR; i += 32 * SK) {
  float v = 0.0f;
  KUNROLL for (int k = 0; k < SK; ++k) v += red[k][i];
  if (n0 + i < N) y[n0 + i] = static_cast<T>(v);
}
