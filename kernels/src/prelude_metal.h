// Portability prelude, Metal side (mx.fast.metal_kernel). Same names as prelude_cuda.h.
#define KDEV device
#define KTHREAD thread
#define KSHARED threadgroup
#ifndef KTG
#define KTG threadgroup  // pointers into threadgroup memory (the CPU emulator defines it empty)
#endif
#define KBARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define KUNROLL _Pragma("unroll")
#define KINLINE inline

KINLINE float k_as_float(uint32_t u) { return as_type<float>(u); }
KINLINE uint32_t k_as_uint(float f) { return as_type<uint32_t>(f); }

KINLINE float2 k_f16x2(uint32_t u) { return float2(as_type<half2>(u)); }
KINLINE float2 k_bf16x2(uint32_t u) {
  return float2(as_type<float>(u << 16), as_type<float>(u & 0xFFFF0000u));
}

KINLINE float k_simd_sum(float v) { return simd_sum(v); }

KINLINE float k_silu(float v) { return v / (1.0f + metal::exp(-v)); }
KINLINE float k_rsqrt(float v) { return metal::precise::rsqrt(v); }
KINLINE float k_sin(float v) { return metal::precise::sin(v); }
KINLINE float k_cos(float v) { return metal::precise::cos(v); }

KINLINE float k_fma(float a, float b, float c) { return fma(a, b, c); }

KINLINE uint32_t k_pack_f16x2(float a, float b) { return as_type<uint32_t>(half2(half(a), half(b))); }

// bfloat16 by round-to-nearest-even on the bits (as CUDA's __floats2bfloat162_rn)
KINLINE uint32_t k_bf16_bits(float f) {
  const uint32_t u = as_type<uint32_t>(f);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
KINLINE uint32_t k_pack_bf16x2(float a, float b) { return k_bf16_bits(a) | (k_bf16_bits(b) << 16); }

KINLINE uint4 k_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return uint4(a, b, c, d); }

// Lane exchange within a simdgroup (xor butterfly), exp, and MLX's own sigmoid formula on
// this backend (so a kernel's scores equal mx.sigmoid's bit for bit where the exp matches).
KINLINE float k_simd_xor(float v, uint32_t m) { return simd_shuffle_xor(v, (unsigned short)m); }
KINLINE uint32_t k_simd_xor_u(uint32_t v, uint32_t m) { return simd_shuffle_xor(v, (unsigned short)m); }
KINLINE float k_exp(float v) { return metal::exp(v); }
KINLINE float k_sigmoid(float v) {
  const float y = 1.0f / (1.0f + metal::exp(-metal::abs(v)));
  return (v < 0.0f) ? 1.0f - y : y;
}

KINLINE float k_simd_max(float v) { return simd_max(v); }
KINLINE float k_exp2(float v) { return metal::exp2(v); }
KINLINE float4 k_float4(float a, float b, float c, float d) { return float4(a, b, c, d); }

// The m16n8k16 multiply-accumulate of prelude_cuda.h (same fragments, same result up to the
// order of the float sums), done with lane shuffles: correct, not fast. A Mac build would map
// it onto simdgroup_matrix; until then the measured selection keeps MLX's kernel where this
// one loses.
template <int XK> KINLINE float k_dot16x2(uint32_t u, uint32_t v) {
  const float2 a = (XK == 1) ? k_f16x2(u) : k_bf16x2(u);
  const float2 b = (XK == 1) ? k_f16x2(v) : k_bf16x2(v);
  return fma(a.x, b.x, a.y * b.y);
}
template <int XK>
KINLINE void k_mma16816(thread float* d, const thread uint32_t* a, const thread uint32_t* b,
                        uint32_t lane) {
  const ushort g = ushort(lane >> 2), c = ushort(lane & 3u);
  KUNROLL for (ushort cc = 0; cc < 4; ++cc) {
    const ushort la = ushort(4 * g + cc), lb0 = ushort(8 * c + cc), lb1 = ushort(8 * c + 4 + cc);
    const uint32_t a0 = simd_shuffle(a[0], la), a1 = simd_shuffle(a[1], la);
    const uint32_t a2 = simd_shuffle(a[2], la), a3 = simd_shuffle(a[3], la);
    const uint32_t b00 = simd_shuffle(b[0], lb0), b01 = simd_shuffle(b[1], lb0);
    const uint32_t b10 = simd_shuffle(b[0], lb1), b11 = simd_shuffle(b[1], lb1);
    d[0] += k_dot16x2<XK>(a0, b00) + k_dot16x2<XK>(a2, b01);
    d[1] += k_dot16x2<XK>(a0, b10) + k_dot16x2<XK>(a2, b11);
    d[2] += k_dot16x2<XK>(a1, b00) + k_dot16x2<XK>(a3, b01);
    d[3] += k_dot16x2<XK>(a1, b10) + k_dot16x2<XK>(a3, b11);
  }
}

// prelude_cuda.h's k_dq_pair, in float: (m - base) * s + b rounded once to the 16-bit kind.
template <int XK>
KINLINE uint32_t k_dq_pair(uint32_t m, uint32_t s2, uint32_t b2) {
  const float base = (XK == 1) ? 1024.0f : 128.0f;
  const float2 v = (XK == 1) ? k_f16x2(m) : k_bf16x2(m);
  const float2 s = (XK == 1) ? k_f16x2(s2) : k_bf16x2(s2);
  const float2 b = (XK == 1) ? k_f16x2(b2) : k_bf16x2(b2);
  const float lo = fma(v.x - base, s.x, b.x), hi = fma(v.y - base, s.y, b.y);
  return (XK == 1) ? k_pack_f16x2(lo, hi) : k_pack_bf16x2(lo, hi);
}

// prelude_cuda.h's asynchronous copies as plain copies (Metal has no cp.async): the same body
// stays correct, without the overlap.
KINLINE void k_cp16(KTG void* dst, const device void* src, bool valid) {
  *(KTG uint4*)dst = valid ? *(const device uint4*)src : uint4(0u, 0u, 0u, 0u);
}
KINLINE void k_cp4(KTG void* dst, const device void* src, bool valid) {
  *(KTG uint32_t*)dst = valid ? *(const device uint32_t*)src : 0u;
}
KINLINE void k_cp_commit() {}
template <int N>
KINLINE void k_cp_wait() {}
KINLINE void k_simd_barrier() { simdgroup_barrier(mem_flags::mem_threadgroup); }

// prelude_cuda.h's k_and_or (one LOP3 there)
KINLINE uint32_t k_and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }

// prelude_cuda.h's warpgroup products do not exist here (K_HAS_WGMMA 0): bodies take their
// per-simdgroup k_mma16816 form, and the fences are empty.
#define K_HAS_WGMMA 0
KINLINE void k_wg_fence() {}
KINLINE void k_wg_commit() {}
template <int N>
KINLINE void k_wg_wait() {}
template <int N>
KINLINE void k_wg_keep(thread float* v) {}
template <int N>
KINLINE void k_wg_keep_u(thread uint32_t* v) {}
// Threadgroup memory of `bytes` (Metal's are static; 32 KB at most).
#define K_SHARED_1K(name, bytes) threadgroup uint8_t name[bytes];
