// Portability prelude, CUDA side (NVRTC, through mx.fast.cuda_kernel).
// Kernel bodies use only these names; prelude_metal.h defines the same set for Metal.
#define KDEV                         // address space of device pointers (Metal: `device`)
#define KTHREAD                      // address space of thread-local arrays (Metal: `thread`)
#define KSHARED __shared__           // threadgroup (shared) memory
#define KTG                          // address space of pointers into it (Metal: `threadgroup`)
#define KBARRIER() __syncthreads()
#define KUNROLL _Pragma("unroll")
#define KINLINE __device__ __forceinline__


KINLINE float k_as_float(uint32_t u) { return __uint_as_float(u); }
KINLINE uint32_t k_as_uint(float f) { return __float_as_uint(f); }

// Two packed float16 values (low half first) to float.
KINLINE float2 k_f16x2(uint32_t u) {
  __half2 h = *reinterpret_cast<__half2*>(&u);
  return __half22float2(h);
}
// Two packed bfloat16 values to float: a bfloat16 is the top half of a float.
KINLINE float2 k_bf16x2(uint32_t u) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xFFFF0000u));
}

// Sum over the 32 lanes of a warp (a Metal simdgroup); every lane gets the total.
KINLINE float k_simd_sum(float v) {
  KUNROLL
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

KINLINE float k_silu(float v) { return v / (1.0f + __expf(-v)); }
KINLINE float k_rsqrt(float v) { return rsqrtf(v); }
// sin and cos of an angle in radians, full float accuracy (RoPE angles reach ~1e5)
KINLINE float k_sin(float v) { return sinf(v); }
KINLINE float k_cos(float v) { return cosf(v); }

KINLINE float k_fma(float a, float b, float c) { return fmaf(a, b, c); }

// float pairs to packed 16-bit pairs (round to nearest even), low half first.
KINLINE uint32_t k_pack_f16x2(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

KINLINE uint32_t k_pack_bf16x2(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

KINLINE uint4 k_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return make_uint4(a, b, c, d); }

// Lane exchange within a warp (xor butterfly), exp, and MLX's own sigmoid formula on this
// backend (mlx/backend/cuda/device/unary_ops.cuh), so a kernel's scores match mx.sigmoid's.
KINLINE float k_simd_xor(float v, uint32_t m) { return __shfl_xor_sync(0xFFFFFFFFu, v, m); }
KINLINE uint32_t k_simd_xor_u(uint32_t v, uint32_t m) { return __shfl_xor_sync(0xFFFFFFFFu, v, m); }
KINLINE float k_exp(float v) { return expf(v); }
KINLINE float k_sigmoid(float v) {
  const float y = 1.0f / (1.0f + expf(fabsf(v)));
  return (v < 0.0f) ? y : 1.0f - y;
}

// Maximum over the 32 lanes of a warp; every lane gets it.
KINLINE float k_simd_max(float v) {
  KUNROLL
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
KINLINE float k_exp2(float v) { return exp2f(v); }
KINLINE float4 k_float4(float a, float b, float c, float d) { return make_float4(a, b, c, d); }

// Tensor cores: d (16x8, float) += a (16x16) * b (16x8) with PTX's mma.m16n8k16 fragments
// (lane = 4 g + c; pairs of 16-bit values of kind XK, 1 float16 or 2 bfloat16, low half first):
// a[0] = A[g][2c, 2c+1], a[1] = A[g+8][2c, 2c+1], a[2] = A[g][2c+8, 2c+9], a[3] = A[g+8][2c+8, 2c+9];
// b[0] = B[2c, 2c+1][g], b[1] = B[2c+8, 2c+9][g]; d = D[g][2c], D[g][2c+1], D[g+8][2c], D[g+8][2c+1].
template <int XK>
KINLINE void k_mma16816(KTHREAD float* d, KTHREAD const uint32_t* a, KTHREAD const uint32_t* b,
                        uint32_t lane) {
  (void)lane;
  if (XK == 1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Two affine weights (m - base) * s + b from two codes OR-ed into the exponent of `base`
// (float16 1024, bfloat16 128: the code lands in the mantissa, exactly), in 16-bit pair
// arithmetic: one subtraction and one FMA per two weights. s2, b2: s and b twice, kind XK.
template <int XK>
KINLINE uint32_t k_dq_pair(uint32_t m, uint32_t s2, uint32_t b2) {
  uint32_t r;
  if (XK == 1) {
    const uint32_t base = 0x64006400u;
    __half2 v = __hsub2(*reinterpret_cast<__half2*>(&m), *reinterpret_cast<const __half2*>(&base));
    v = __hfma2(v, *reinterpret_cast<__half2*>(&s2), *reinterpret_cast<__half2*>(&b2));
    r = *reinterpret_cast<uint32_t*>(&v);
  } else {
    const uint32_t base = 0x43004300u;
    __nv_bfloat162 v = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&m),
                               *reinterpret_cast<const __nv_bfloat162*>(&base));
    v = __hfma2(v, *reinterpret_cast<__nv_bfloat162*>(&s2), *reinterpret_cast<__nv_bfloat162*>(&b2));
    r = *reinterpret_cast<uint32_t*>(&v);
  }
  return r;
}

// Asynchronous copies into threadgroup memory (cp.async): a 16- or 4-byte copy that does not
// hold a register while in flight; `valid` false fills zeros. Copies issued since the last
// k_cp_commit form a group; k_cp_wait<N>() waits until at most N of this thread's groups are
// in flight. Another lane's copies are visible after its wait and a k_simd_barrier().
KINLINE void k_cp16(KTG void* dst, const void* src, bool valid) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0));
}
KINLINE void k_cp4(KTG void* dst, const void* src, bool valid) {
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(d), "l"(src),
               "r"(valid ? 4 : 0));
}
KINLINE void k_cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
KINLINE void k_cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }
KINLINE void k_simd_barrier() { __syncwarp(); }

// (a & b) | c as one LOP3: written as C, a mask and a magic constant that are both immediates
// compile to two instructions (one LOP3 takes one immediate), on the decode's hottest path.
KINLINE uint32_t k_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
