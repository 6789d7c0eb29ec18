// Helpers of the folded decode GEMV (qmv_fold.h and its fused variants; see qmv_fold.h).
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

// NORM: fold_x_fragment of x * nw (eight values each), adding sum(x^2) into ssq.
template <int XK>
KINLINE uint4 fold_x_norm_fragment(uint4 xv, uint4 nv, KTHREAD float& ssq) {
  const uint32_t xw[4] = {xv.x, xv.y, xv.z, xv.w}, nw4[4] = {nv.x, nv.y, nv.z, nv.w};
  float v[8];
  KUNROLL for (int i = 0; i < 4; ++i) {
    const float2 a = (XK == 1) ? k_f16x2(xw[i]) : k_bf16x2(xw[i]);
    const float2 b = (XK == 1) ? k_f16x2(nw4[i]) : k_bf16x2(nw4[i]);
    ssq = k_fma(a.x, a.x, k_fma(a.y, a.y, ssq));
    v[2 * i] = a.x * b.x;
    v[2 * i + 1] = a.y * b.y;
  }
  const float sc = (XK == 1) ? 0.0625f : 1.0f;  // x / 16 where float16 takes codes at 16 q
  return k_uint4(k_pack16x2<XK>(v[0], v[4]), k_pack16x2<XK>(v[1] * sc, v[5] * sc),
                 k_pack16x2<XK>(v[2], v[6]), k_pack16x2<XK>(v[3] * sc, v[7] * sc));
}

// One 16-bit value (low or high half of a word) of kind K16 as float.
template <int K16>
KINLINE float fold_half(uint32_t w, int hi) {
  if (K16 == 2) return k_as_float(hi ? (w & 0xFFFF0000u) : (w << 16));
  const float2 f = k_f16x2(w);
  return hi ? f.y : f.x;
}

// The sums product of one x fragment: A is constant (rows g: the code base, rows g + 8: 1, or
// 16 where float16 holds x / 16), so rows g give each column's OFF and rows g + 8 its X.
template <int XK>
KINLINE void fold_sums(KTHREAD float* sums, uint4 xf, uint32_t lane) {
  const uint32_t off = (XK == 1) ? 0x64006400u : 0x43004300u;  // 1024 or 128
  const uint32_t one = (XK == 1) ? 0x3C003C00u : 0x3F803F80u;  // 1
  const uint32_t a[4] = {off, one, off, (XK == 1) ? 0x4C004C00u : one};  // 16 or 1
  const uint32_t b0[2] = {xf.x, xf.y}, b1[2] = {xf.z, xf.w};
  k_mma16816<XK>(sums, a, b0, lane);
  k_mma16816<XK>(sums, a, b1, lane);
}

// The products of one code word of rows g (wg) and g + 8 (wh) with its x fragment into d.
template <int XK>
KINLINE void fold_word(KTHREAD float* d, uint32_t wg, uint32_t wh, uint4 xf, uint32_t lane) {
  uint32_t pg[4], ph[4];
  fold_pairs<XK>(wg, pg);
  fold_pairs<XK>(wh, ph);
  const uint32_t a0[4] = {pg[0], ph[0], pg[1], ph[1]}, a1[4] = {pg[2], ph[2], pg[3], ph[3]};
  const uint32_t b0[2] = {xf.x, xf.y}, b1[2] = {xf.z, xf.w};
  k_mma16816<XK>(d, a0, b0, lane);
  k_mma16816<XK>(d, a1, b1, lane);
}
