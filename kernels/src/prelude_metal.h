// Portability prelude, Metal side (mx.fast.metal_kernel). Same names as prelude_cuda.h.
#define KDEV device
#define KTHREAD thread
#define KSHARED threadgroup
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

KINLINE float k_fma(float a, float b, float c) { return fma(a, b, c); }

KINLINE uint32_t k_pack_f16x2(float a, float b) { return as_type<uint32_t>(half2(half(a), half(b))); }

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
