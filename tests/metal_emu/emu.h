// CPU emulation of the Metal subset the kernels use, for tests/metal_emulator.py (the one kernel
// emulator; it compiles launch.render_metal, prelude_metal.h included): one std::thread
// per GPU thread, simdgroups of 32, threadgroup arrays become function statics (one threadgroup
// runs at a time). Slow, and it proves nothing about timing or memory ordering on a real GPU;
// it runs a kernel body's index arithmetic, barriers and simdgroup reductions on a CPU.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>
#include <barrier>
#include <thread>
#include <vector>
#define device
#define constant
#define thread
#define threadgroup static
#define KTG  // a pointer into threadgroup memory is a plain pointer here
namespace metal {
struct half { _Float16 v; half() = default; half(float f) : v((_Float16)f) {} operator float() const { return (float)v; } };
struct bfloat { uint16_t b; bfloat() = default;
  bfloat(float f) { uint32_t u; memcpy(&u, &f, 4); b = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; }
  operator float() const { uint32_t u = uint32_t(b) << 16; float f; memcpy(&f, &u, 4); return f; } };
template <typename T> struct vec2 { T x, y; vec2() = default; vec2(T a, T b) : x(a), y(b) {}
  template <typename U> explicit vec2(const vec2<U>& o) : x(T(o.x)), y(T(o.y)) {} };
template <typename T> struct vec3 { T x, y, z; };
template <typename T> struct vec4 { T x, y, z, w; vec4() = default; vec4(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {} };
typedef unsigned int uint; typedef unsigned short ushort;
typedef vec2<float> float2; typedef vec4<float> float4; typedef vec2<half> half2;
typedef vec2<uint> uint2; typedef vec3<uint> uint3; typedef vec4<uint> uint4;
template <typename To, typename From> To as_type(From v) { static_assert(sizeof(To) == sizeof(From)); To t; memcpy(&t, &v, sizeof(To)); return t; }
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
extern std::barrier<>* g_bar;
extern std::barrier<>* g_sbar[32];
extern float g_simd[32][32];
extern thread_local int t_lane, t_sid;
inline void threadgroup_barrier(mem_flags) { g_bar->arrive_and_wait(); }
inline void simdgroup_barrier(mem_flags) { g_sbar[t_sid]->arrive_and_wait(); }
inline float simd_sum(float v) { g_simd[t_sid][t_lane] = v; g_sbar[t_sid]->arrive_and_wait();
  float s = 0; for (int i = 0; i < 32; ++i) s += g_simd[t_sid][i]; g_sbar[t_sid]->arrive_and_wait(); return s; }
inline float simd_max(float v) { g_simd[t_sid][t_lane] = v; g_sbar[t_sid]->arrive_and_wait();
  float s = g_simd[t_sid][0]; for (int i = 1; i < 32; ++i) s = std::fmax(s, g_simd[t_sid][i]); g_sbar[t_sid]->arrive_and_wait(); return s; }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float exp(float a) { return std::exp(a); }
inline float abs(float a) { return std::fabs(a); }
namespace precise { inline float rsqrt(float a) { return 1.0f / std::sqrt(a); }
  inline float sin(float a) { return std::sin(a); } inline float cos(float a) { return std::cos(a); } }
template <typename V> inline V simd_shuffle_xor(V v, unsigned short m) {
  static_assert(sizeof(V) == 4);
  float f; memcpy(&f, &v, 4); g_simd[t_sid][t_lane] = f; g_sbar[t_sid]->arrive_and_wait();
  f = g_simd[t_sid][t_lane ^ m]; g_sbar[t_sid]->arrive_and_wait(); memcpy(&v, &f, 4); return v; }
template <typename V> inline V simd_shuffle(V v, unsigned short l) {
  static_assert(sizeof(V) == 4);
  float f; memcpy(&f, &v, 4); g_simd[t_sid][t_lane] = f; g_sbar[t_sid]->arrive_and_wait();
  f = g_simd[t_sid][l & 31]; g_sbar[t_sid]->arrive_and_wait(); memcpy(&v, &f, 4); return v; }
inline float exp2(float a) { return std::exp2(a); }
}
using namespace metal;
typedef half float16_t;
typedef bfloat bfloat16_t;
