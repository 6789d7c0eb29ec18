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

// Warpgroup tensor-core products (Hopper's wgmma, sm_90a; MLX compiles for it on compute
// capability 9.x). Elsewhere K_HAS_WGMMA is 0 and a body computes the same product per warp
// with k_mma16816 (large_qmm.h). k_wg_fence: before a product whose A or accumulator registers
// other instructions wrote; k_wg_commit closes a group of products; k_wg_wait<N> waits until at
// most N groups are in flight; k_wg_keep pins registers an asynchronous product still uses.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define K_HAS_WGMMA 1
#else
#define K_HAS_WGMMA 0
#endif
KINLINE void k_wg_fence() {
#if K_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
KINLINE void k_wg_commit() {
#if K_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
template <int N>
KINLINE void k_wg_wait() {
#if K_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#endif
}
template <int N>
KINLINE void k_wg_keep(KTHREAD float* v) {
  KUNROLL for (int i = 0; i < N; ++i) asm volatile("" : "+f"(v[i])::"memory");
}
template <int N>
KINLINE void k_wg_keep_u(KTHREAD uint32_t* v) {
  KUNROLL for (int i = 0; i < N; ++i) asm volatile("" : "+r"(v[i])::"memory");
}
#define K_WG_D32 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define K_WG_MMA64(TY)                                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\nwgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY \
               " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n" \
               : K_WG_D32 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))
// d (64 x 64 floats over the warpgroup, 32 a thread: n8 tile j in d[4j .. 4j+3] as
// k_mma16816's D) += A (64 x 16: this warp's 16 rows, k_mma16816's A fragment) * B (16 x 64),
// B's 64 columns the rows of a K-major tile in shared memory at `b` (1024-byte aligned, rows
// 128 bytes apart, 16-byte units XOR-swizzled by row % 8: the 128-byte swizzle), its k slice
// at byte koff of each row.
template <int XK>
KINLINE void k_wg_mma64(KTHREAD float* d, KTHREAD const uint32_t* a, KTG const uint8_t* b,
                        int koff) {
#if K_HAS_WGMMA
  const uint32_t addr = (uint32_t)__cvta_generic_to_shared(b) + uint32_t(koff);
  const uint64_t desc = uint64_t((addr & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) |
                        (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
  if (XK == 1) {
    K_WG_MMA64("f16");
  } else {
    K_WG_MMA64("bf16");
  }
#endif
}
// Dynamic shared memory of `bytes` (the launch asks for 1024 more), 1024-byte aligned as the
// 128-byte swizzle of warpgroup products needs.
#define K_SHARED_1K(name, bytes)                                                           \
  extern __shared__ uint8_t name##_raw_[];                                                 \
  uint8_t* name = (uint8_t*)((size_t(name##_raw_) + 1023) & ~size_t(1023));
