// dequantize: w[n, k] = scales[n, g] * q[n, k] + biases[n, g] (affine, MLX's layout), written
// in T. 2/4/8 bits into 16-bit T (UNIT8): one thread per 8 consecutive codes, so a simdgroup's
// loads and its 16-byte stores are each one contiguous run (a thread per 32 codes stored 16 of
// every 64 bytes per instruction: 1.9 TB/s on an H200). Otherwise one thread per 32 codes:
// BITS words in, 64 bytes (float16/bfloat16) or 128 bytes (float32) out as 16-byte stores.
// Template constants: T (output), XK (0 float32, 1 float16, 2 bfloat16), BITS, GS, K, NCH
// (number of 32-code chunks in all = N * K / 32).
//// INCLUDE quant_common.h
//// BODY
constexpr int KW = K * BITS / 32;
constexpr int NG = K / GS;
constexpr int CH = K / 32;
constexpr bool UNIT8 = (XK != 0) && (BITS == 2 || BITS == 4 || BITS == 8);
if (UNIT8) {
  if (int(gid) >= NCH * 4) return;
  const int row = int(gid) / (K / 8);
  const int cu = int(gid) % (K / 8);
  const KDEV uint32_t* rp = w + size_t(row) * KW;
  uint32_t lo = 0u, hi = 0u;
  if (BITS == 8) {
    lo = rp[2 * cu];
    hi = rp[2 * cu + 1];
  } else if (BITS == 4) {
    lo = rp[cu];
  } else {
    lo = rp[cu / 2] >> (16 * (cu & 1));
  }
  const float s = float(scales[size_t(row) * NG + (cu * 8) / GS]);
  const float b = float(biases[size_t(row) * NG + (cu * 8) / GS]);
  float v[8];
  KUNROLL for (int j = 0; j < 8; ++j) {
    const uint32_t wd = (BITS == 8 && j >= 4) ? hi : lo;
    const int sh = (BITS == 8) ? 8 * (j & 3) : BITS * j;
    v[j] = s * float((wd >> sh) & ((1u << BITS) - 1u)) + b;
  }
  KDEV uint4* op8 = (KDEV uint4*)(out + size_t(row) * K + size_t(cu) * 8);
  if (XK == 1) {
    op8[0] = k_uint4(k_pack_f16x2(v[0], v[1]), k_pack_f16x2(v[2], v[3]),
                     k_pack_f16x2(v[4], v[5]), k_pack_f16x2(v[6], v[7]));
  } else {
    op8[0] = k_uint4(k_pack_bf16x2(v[0], v[1]), k_pack_bf16x2(v[2], v[3]),
                     k_pack_bf16x2(v[4], v[5]), k_pack_bf16x2(v[6], v[7]));
  }
  return;
}
if (int(gid) >= NCH) return;
const int row = int(gid) / CH;
const int c = int(gid) % CH;
uint32_t words[BITS];
const KDEV uint32_t* wp = w + size_t(row) * KW + size_t(c) * BITS;
K_LOAD_CODES(words, wp)
const float s = float(scales[size_t(row) * NG + (c * 32) / GS]);
const float b = float(biases[size_t(row) * NG + (c * 32) / GS]);
KDEV uint4* op = (KDEV uint4*)(out + size_t(row) * K + size_t(c) * 32);
KUNROLL for (int j0 = 0; j0 < 32; j0 += 8) {
  float v[8];
  KUNROLL for (int jj = 0; jj < 8; ++jj) v[jj] = s * float(K_CODE(words, j0 + jj)) + b;
  if (XK == 0) {
    op[j0 / 4] = k_uint4(k_as_uint(v[0]), k_as_uint(v[1]), k_as_uint(v[2]), k_as_uint(v[3]));
    op[j0 / 4 + 1] = k_uint4(k_as_uint(v[4]), k_as_uint(v[5]), k_as_uint(v[6]), k_as_uint(v[7]));
  } else if (XK == 1) {
    op[j0 / 8] = k_uint4(k_pack_f16x2(v[0], v[1]), k_pack_f16x2(v[2], v[3]),
                       k_pack_f16x2(v[4], v[5]), k_pack_f16x2(v[6], v[7]));
  } else {
    op[j0 / 8] = k_uint4(k_pack_bf16x2(v[0], v[1]), k_pack_bf16x2(v[2], v[3]),
                       k_pack_bf16x2(v[4], v[5]), k_pack_bf16x2(v[6], v[7]));
  }
}
