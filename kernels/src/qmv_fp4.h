// qmv_fp4: y[m, n] = sum_k x[m, k] * scale[n, k / GS] * e2m1(q[n, k]) for the FP4 formats in
// MLX's layout: codes packed 8 per uint32 little-endian along k; FMT 0 = mxfp4 (GS 32, E8M0
// scale bytes), FMT 1 = nvfp4 (GS 16, E4M3 scale bytes). No biases.
//
// Work layout as qmv: one simdgroup owns R rows, SK simdgroups split K, each lane takes 32
// consecutive k per step (one 16-byte load per row). Decoding: the three magnitude bits of an
// E2M1 code, moved to bits 9-11 of a float16 (sign to bit 15), make a float16 equal to the
// code's value times 2^-14 (subnormals included: code 1 is 0.5 * 2^-14), so one mask/shift
// pass turns two codes into a half2 and one conversion into two exact floats; the 2^14 is
// applied with the scale once per group. An E4M3 byte's seven low bits moved to bits 7-13 of
// a float16 likewise give its value times 2^-8 (0x7F, NaN in E4M3, decodes as 480; quantizers
// never write it).
//
// Template constants: T (x, y), XK (0 float32, 1 float16, 2 bfloat16), FMT, R, SK, M (rows of
// x per threadgroup), MT (rows of x in all), K, N.
//// INCLUDE quant_common.h
//// BODY
constexpr int GS = (FMT == 0) ? 32 : 16;
constexpr int KW = K / 8;       // words per weight row
constexpr int NG = K / GS;      // scale bytes per row
constexpr int CH = K / 32;      // 32-value steps per row
constexpr int GPS = 32 / GS;    // groups per step: 1 (mxfp4) or 2 (nvfp4)

const int row0 = int(tg_x) * R;
const int mbase = int(tg_y) * M;

float acc[R][M];
KUNROLL for (int r = 0; r < R; ++r) {
  KUNROLL for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
}

for (int c = int(simd_id) * 32 + int(lane); c < CH; c += 32 * SK) {
  uint32_t wv[R][4];
  float sc[R][GPS];
  KUNROLL for (int r = 0; r < R; ++r) {
    const int row = (row0 + r < N) ? (row0 + r) : (N - 1);  // clamped: valid loads, no writes
    const uint4 v = ((const KDEV uint4*)(w + size_t(row) * KW))[c];
    wv[r][0] = v.x; wv[r][1] = v.y; wv[r][2] = v.z; wv[r][3] = v.w;
    KUNROLL for (int g = 0; g < GPS; ++g) {
      const uint32_t s = uint32_t(scales[size_t(row) * NG + size_t(c) * GPS + g]);
      if (FMT == 0) {
        // E8M0: 2^(s - 127); s = 0 is 2^-127 (a float32 subnormal), 255 is inf
        sc[r][g] = (s == 0u) ? k_as_float(0x00400000u) : k_as_float(s << 23);
      } else {
        const float2 f = k_f16x2(((s & 0x7Fu) << 7) | ((s & 0x80u) << 8));
        sc[r][g] = f.x * 256.0f;
      }
    }
  }

  float part[R][M][GPS];
  KUNROLL for (int r = 0; r < R; ++r) {
    KUNROLL for (int m = 0; m < M; ++m) {
      KUNROLL for (int g = 0; g < GPS; ++g) part[r][m][g] = 0.0f;
    }
  }
  KUNROLL for (int i = 0; i < 4; ++i) {  // word i holds k = 8i .. 8i + 7 of this step
    float xf[M][8];
    KUNROLL for (int m = 0; m < M; ++m) {
      const int mr = (mbase + m < MT) ? (mbase + m) : (MT - 1);
      K_LOAD_X8(xf[m], x + size_t(mr) * K + size_t(c) * 32 + 8 * i)
    }
    const int g = (GPS == 1) ? 0 : i / 2;  // a constant once unrolled
    KUNROLL for (int r = 0; r < R; ++r) {
      KUNROLL for (int j = 0; j < 4; ++j) {  // codes j and j + 4 of the word, as one half2
        const uint32_t t = (wv[r][i] >> (4 * j)) & 0x000F000Fu;
        const float2 v = k_f16x2(((t & 0x00070007u) << 9) | ((t & 0x00080008u) << 12));
        KUNROLL for (int m = 0; m < M; ++m) {
          part[r][m][g] = k_fma(xf[m][j], v.x, part[r][m][g]);
          part[r][m][g] = k_fma(xf[m][j + 4], v.y, part[r][m][g]);
        }
      }
    }
  }
  KUNROLL for (int r = 0; r < R; ++r) {
    KUNROLL for (int m = 0; m < M; ++m) {
      KUNROLL for (int g = 0; g < GPS; ++g) acc[r][m] += (part[r][m][g] * 16384.0f) * sc[r][g];
    }
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
