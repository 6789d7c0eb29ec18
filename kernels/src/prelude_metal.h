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
