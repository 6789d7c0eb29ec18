// The portability prelude (kernels/src/prelude_*.h) emulated on the CPU, so a kernel body runs
// under g++ without a GPU: one std::thread per GPU thread of a threadgroup, threadgroups one
// after another, KSHARED arrays as statics (shared by the threads of the running threadgroup),
// lane exchanges through a buffer between two barriers. Float math is the host's (expf, not
// the GPU's fast exp): results match a GPU to rounding, not bit for bit. See kernel_emu.py.
#include <cstdint>
#include <cstddef>
#include <cstring>
#include <cmath>
#include <barrier>
#include <thread>
#include <vector>
#include <functional>
#define KDEV
#define KTHREAD
#define KSHARED static
#define KUNROLL
#define KINLINE inline
struct float2 { float x, y; };
struct uint4 { uint32_t x, y, z, w; };
struct uint2 { uint32_t x, y; };
struct bf16 { uint16_t b; bf16() = default; bf16(float f) { uint32_t u; memcpy(&u, &f, 4); b = (u + 0x7FFF + ((u >> 16) & 1)) >> 16; }
  operator float() const { uint32_t u = uint32_t(b) << 16; float f; memcpy(&f, &u, 4); return f; } };
typedef _Float16 f16;
extern std::barrier<>* g_bar;
extern float g_xf[1024]; extern uint32_t g_xu[1024];
extern thread_local uint32_t t_tid;
inline void KBARRIER() { g_bar->arrive_and_wait(); }
inline float k_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t k_as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float2 k_f16x2(uint32_t u) { f16 a, b; uint16_t lo = u & 0xFFFF, hi = u >> 16; memcpy(&a, &lo, 2); memcpy(&b, &hi, 2); return {float(a), float(b)}; }
inline float2 k_bf16x2(uint32_t u) { return {k_as_float(u << 16), k_as_float(u & 0xFFFF0000u)}; }
inline float k_simd_xor(float v, uint32_t m) { g_xf[t_tid] = v; KBARRIER(); float r = g_xf[(t_tid & ~31u) | ((t_tid & 31u) ^ m)]; KBARRIER(); return r; }
inline uint32_t k_simd_xor_u(uint32_t v, uint32_t m) { g_xu[t_tid] = v; KBARRIER(); uint32_t r = g_xu[(t_tid & ~31u) | ((t_tid & 31u) ^ m)]; KBARRIER(); return r; }
inline float k_simd_sum(float v) { for (uint32_t o = 16; o > 0; o >>= 1) v += k_simd_xor(v, o); return v; }
inline float k_silu(float v) { return v / (1.0f + expf(-v)); }
inline float k_fma(float a, float b, float c) { return fmaf(a, b, c); }
inline float k_exp(float v) { return expf(v); }
inline float k_sigmoid(float v) { const float y = 1.0f / (1.0f + expf(fabsf(v))); return (v < 0.0f) ? y : 1.0f - y; }
