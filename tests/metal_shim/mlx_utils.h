// Stand-in for the preamble MLX prepends to every custom Metal kernel (metal::utils()):
// the standard library and MLX's names for the float types.
#pragma once
#include <metal_stdlib>
using namespace metal;
typedef half float16_t;
typedef bfloat bfloat16_t;
// simdgroup lane exchange (the MoE router; qmm's Metal multiply-accumulate), not in the stand-in <metal_stdlib>
namespace metal {
float simd_shuffle_xor(float, unsigned short);
uint simd_shuffle_xor(uint, unsigned short);
uint simd_shuffle(uint, unsigned short);
}
namespace metal { float exp2(float); }
