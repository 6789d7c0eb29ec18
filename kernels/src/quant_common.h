// Shared pieces of the quantized kernels (included by qmv.h, gated_mlp.h, dequantize.h, the MoE
// expert kernels, qmv_fp4.h and qmm.h).

// Two floats as a packed pair of the activation kind XK (1 float16, 2 bfloat16), low first.
template <int XK> KINLINE uint32_t k_pack16x2(float a, float b) {
  return (XK == 1) ? k_pack_f16x2(a, b) : k_pack_bf16x2(a, b);
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

// Eight consecutive activations as floats, from one 16-byte load (two for float32). XK is the
// activation kind: 0 float32, 1 float16, 2 bfloat16.
#define K_LOAD_X8(dst, xp)                                                                 \
  {                                                                                        \
    const KDEV uint4* p_ = (const KDEV uint4*)(xp);                                        \
    if (XK == 0) {                                                                         \
      const uint4 a_ = p_[0];                                                              \
      const uint4 b_ = p_[1];                                                              \
      dst[0] = k_as_float(a_.x); dst[1] = k_as_float(a_.y);                                \
      dst[2] = k_as_float(a_.z); dst[3] = k_as_float(a_.w);                                \
      dst[4] = k_as_float(b_.x); dst[5] = k_as_float(b_.y);                                \
      dst[6] = k_as_float(b_.z); dst[7] = k_as_float(b_.w);                                \
    } else {                                                                               \
      const uint4 a_ = p_[0];                                                              \
      const uint32_t u_[4] = {a_.x, a_.y, a_.z, a_.w};                                     \
      KUNROLL for (int i_ = 0; i_ < 4; ++i_) {                                             \
        const float2 f_ = (XK == 1) ? k_f16x2(u_[i_]) : k_bf16x2(u_[i_]);                  \
        dst[2 * i_] = f_.x;                                                                \
        dst[2 * i_ + 1] = f_.y;                                                            \
      }                                                                                    \
    }                                                                                      \
  }

// The affine code at compile-time position j of a step's words, minus CENTER, as an exact
// float (needs BITS, FAST, MASK and CENTER). FAST (2/4/8 bits: a code never straddles 16 bits):
// (2^23 + q * 2^hs) * 2^-hs - (2^(23-hs) + C) = q - C in one FMA.
#define K_AFFINE_CODE(q, words, j)                                                         \
  {                                                                                        \
    const int p_ = (j) * BITS;                                                             \
    const int a_ = p_ >> 5;                                                                \
    const int s_ = p_ & 31;                                                                \
    if (FAST) {                                                                            \
      const int hs_ = s_ & 15;                                                             \
      const uint32_t src_ = (s_ >= 16) ? ((words)[a_] >> 16) : (words)[a_];                \
      q = k_fma(k_as_float((src_ & (MASK << hs_)) | 0x4B000000u), 1.0f / float(1u << hs_), \
                -(8388608.0f / float(1u << hs_) + CENTER));                                \
    } else {                                                                               \
      uint32_t v_ = (words)[a_] >> s_;                                                     \
      if (s_ + BITS > 32) v_ |= (words)[(a_ + 1 < BITS) ? a_ + 1 : a_] << ((32 - s_) & 31); \
      q = k_as_float((v_ & MASK) | 0x4B000000u) - (8388608.0f + CENTER);                   \
    }                                                                                      \
  }
