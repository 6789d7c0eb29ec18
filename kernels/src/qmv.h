// qmv: y[m, n] = sum_k x[m, k] * (scales[n, g] * q[n, k] + biases[n, g]),  g = k / GS,
// for weights in MLX's affine layout (q packed little-endian along k in uint32 words).
//
// Layout of the work: one simdgroup (warp) owns R output rows; the SK simdgroups of a
// threadgroup split K between them (split-K for short outputs) and meet in threadgroup memory.
// Each lane takes 32 consecutive k per step: BITS words of every one of its R rows, loaded as
// 16-byte vectors where BITS allows, so R * BITS / 4 independent 16-byte loads are in flight.
// The affine bias is folded in as (bias + C * scale) * sum(x over the step), with C = 2^(BITS-1)
// the centre the codes are shifted by, so the inner loop is one logic op, one add and one FMA
// per weight and m: a code masked in place and OR-ed into the mantissa of 2^23 is an exact
// float (2^23 + q * 2^s); the 2^s is undone by pre-scaling x once for all R rows.
//
// Template constants: T (x and y), S (scales, biases), XK (0 float32, 1 float16, 2 bfloat16),
// BITS, GS, R, SK, M (rows of x per threadgroup), MT (rows of x in all), K, N.
//// BODY
constexpr int KW = K * BITS / 32;      // words per weight row
constexpr int NG = K / GS;             // groups per row
constexpr int CH = K / 32;             // 32-value steps per row
constexpr bool FAST = (BITS == 2 || BITS == 4 || BITS == 8);  // codes never straddle 16 bits
constexpr uint32_t MASK = (1u << BITS) - 1u;
constexpr float CENTER = float(1 << (BITS - 1));

const int row0 = int(tg_x) * R;
const int mbase = int(tg_y) * M;

float acc[R][M];
KUNROLL for (int r = 0; r < R; ++r) {
  KUNROLL for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
}

for (int c = int(simd_id) * 32 + int(lane); c < CH; c += 32 * SK) {
  uint32_t wv[R][BITS];
  float sc[R], bc[R];
  const int g = (c * 32) / GS;
  KUNROLL for (int r = 0; r < R; ++r) {
    const int row = (row0 + r < N) ? (row0 + r) : (N - 1);  // clamp: valid loads, no writes
    const KDEV uint32_t* wp = w + size_t(row) * KW + size_t(c) * BITS;
    if (BITS % 4 == 0) {
      KUNROLL for (int i = 0; i < BITS / 4; ++i) {
        const uint4 v = ((const KDEV uint4*)wp)[i];
        wv[r][4 * i] = v.x; wv[r][4 * i + 1] = v.y; wv[r][4 * i + 2] = v.z; wv[r][4 * i + 3] = v.w;
      }
    } else if (BITS % 2 == 0) {
      KUNROLL for (int i = 0; i < BITS / 2; ++i) {
        const uint2 v = ((const KDEV uint2*)wp)[i];
        wv[r][2 * i] = v.x; wv[r][2 * i + 1] = v.y;
      }
    } else {
      KUNROLL for (int i = 0; i < BITS; ++i) wv[r][i] = wp[i];
    }
    const float s = float(scales[size_t(row) * NG + g]);
    sc[r] = s;
    bc[r] = float(biases[size_t(row) * NG + g]) + CENTER * s;
  }

  float part[R][M];
  float sx[M];
  KUNROLL for (int m = 0; m < M; ++m) {
    sx[m] = 0.0f;
    KUNROLL for (int r = 0; r < R; ++r) part[r][m] = 0.0f;
  }

  KUNROLL for (int j0 = 0; j0 < 32; j0 += 8) {
    // x for 8 consecutive k: one 16-byte load per row of x (two for float32).
    float xf[M][8];
    KUNROLL for (int m = 0; m < M; ++m) {
      const int mr = (mbase + m < MT) ? (mbase + m) : (MT - 1);
      const KDEV uint4* xp = (const KDEV uint4*)(x + size_t(mr) * K + size_t(c) * 32 + j0);
      if (XK == 0) {
        const uint4 a = xp[0];
        const uint4 b = xp[1];
        xf[m][0] = k_as_float(a.x); xf[m][1] = k_as_float(a.y);
        xf[m][2] = k_as_float(a.z); xf[m][3] = k_as_float(a.w);
        xf[m][4] = k_as_float(b.x); xf[m][5] = k_as_float(b.y);
        xf[m][6] = k_as_float(b.z); xf[m][7] = k_as_float(b.w);
      } else {
        const uint4 a = xp[0];
        const uint32_t u[4] = {a.x, a.y, a.z, a.w};
        KUNROLL for (int i = 0; i < 4; ++i) {
          const float2 f = (XK == 1) ? k_f16x2(u[i]) : k_bf16x2(u[i]);
          xf[m][2 * i] = f.x;
          xf[m][2 * i + 1] = f.y;
        }
      }
      KUNROLL for (int jj = 0; jj < 8; ++jj) {
        sx[m] += xf[m][jj];
        if (FAST) {
          const int hs = ((j0 + jj) * BITS) & 15;
          xf[m][jj] *= 1.0f / float(1u << hs);
        }
      }
    }
    KUNROLL for (int r = 0; r < R; ++r) {
      KUNROLL for (int jj = 0; jj < 8; ++jj) {
        const int p = (j0 + jj) * BITS;  // bit position in this step's words (compile time)
        const int a = p >> 5;
        const int s = p & 31;
        float q;
        if (FAST) {
          const int hs = s & 15;
          const uint32_t src = (s >= 16) ? (wv[r][a] >> 16) : wv[r][a];
          q = k_as_float((src & (MASK << hs)) | 0x4B000000u) -
              (8388608.0f + CENTER * float(1u << hs));
        } else {
          uint32_t v = wv[r][a] >> s;
          if (s + BITS > 32) v |= wv[r][(a + 1 < BITS) ? a + 1 : a] << ((32 - s) & 31);
          q = k_as_float((v & MASK) | 0x4B000000u) - (8388608.0f + CENTER);
        }
        KUNROLL for (int m = 0; m < M; ++m) part[r][m] = k_fma(xf[m][jj], q, part[r][m]);
      }
    }
  }
  KUNROLL for (int r = 0; r < R; ++r) {
    KUNROLL for (int m = 0; m < M; ++m) acc[r][m] += sc[r] * part[r][m] + bc[r] * sx[m];
  }
}

KSHARED float red[SK][R * M];
KUNROLL for (int r = 0; r < R; ++r) {
  KUNROLL for (int m = 0; m < M; ++m) {
    const float v = k_simd_sum(acc[r][m]);
    if (lane == 0) red[simd_id][r * M + m] = v;
  }
}
KBARRIER();
if (simd_id == 0) {
  for (int i = int(lane); i < R * M; i += 32) {
    float v = 0.0f;
    KUNROLL for (int k = 0; k < SK; ++k) v += red[k][i];
    const int row = row0 + i / M;
    const int m = mbase + i % M;
    if (row < N && m < MT) y[size_t(m) * N + row] = static_cast<T>(v);
  }
}
