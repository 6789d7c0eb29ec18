// Stand-in for the preamble MLX prepends to every custom Metal kernel (metal::utils()):
// the standard library and MLX's names for the float types.
#pragma once
#include <metal_stdlib>
using namespace metal;
typedef half float16_t;
typedef bfloat bfloat16_t;
