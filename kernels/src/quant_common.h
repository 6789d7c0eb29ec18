// Shared pieces of the affine-format kernels (included by qmv.h and dequantize.h).

// bfloat16 from float by round-to-nearest-even on the bits (same on both backends).
KINLINE uint32_t k_bf16_bits(float f) {
  const uint32_t u = k_as_uint(f);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
KINLINE uint32_t k_pack_bf16x2(float a, float b) {
  return k_bf16_bits(a) | (k_bf16_bits(b) << 16);
}

// Load the BITS words holding 32 consecutive codes (16-byte loads where BITS allows).
#define K_LOAD_CODES(dst, wp)                                                              \
  if (BITS % 4 == 0) {                                                                     \
    KUNROLL for (int i_ = 0; i_ < BITS / 4; ++i_) {                                        \
      const uint4 v_ = ((const KDEV uint4*)(wp))[i_];                                      \
      dst[4 * i_] = v_.x; dst[4 * i_ + 1] = v_.y; dst[4 * i_ + 2] = v_.z; dst[4 * i_ + 3] = v_.w; \
    }                                                                                      \
  } else if (BITS % 2 == 0) {                                                              \
    KUNROLL for (int i_ = 0; i_ < BITS / 2; ++i_) {                                        \
      const uint2 v_ = ((const KDEV uint2*)(wp))[i_];                                      \
      dst[2 * i_] = v_.x; dst[2 * i_ + 1] = v_.y;                                          \
    }                                                                                      \
  } else {                                                                                 \
    KUNROLL for (int i_ = 0; i_ < BITS; ++i_) dst[i_] = (wp)[i_];                          \
  }

// Code j (0..31, a compile-time constant after unrolling) of the 32 packed in words[]:
// one little-endian bit stream, so for 3/5/6 bits a code may straddle two words.
#define K_CODE(words, j)                                                                   \
  ((((words)[((j) * BITS) >> 5] >> (((j) * BITS) & 31)) |                                  \
    ((((j) * BITS & 31) + BITS > 32)                                                       \
         ? ((words)[((((j) * BITS) >> 5) + 1 < BITS) ? (((j) * BITS) >> 5) + 1 : 0]        \
            << ((32 - (((j) * BITS) & 31)) & 31))                                          \
         : 0u)) & ((1u << BITS) - 1u))
