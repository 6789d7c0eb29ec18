// qk_rope: one decode token's q/k/v from the fused q/k/v projection output, in one launch:
// split the row into heads, RMSNorm each q and k head (NORM = 1, Qwen3's q_norm/k_norm), scale
// by the YaRN attention factor (SCALE) and rotate q and k by RoPE at the row's position (HF's
// half-split layout: element i pairs with i + D/2); v heads are copied out. Replaces the
// slices, two norms and two rope launches (and the copy of v) that each layer ran at decode.
//
// Inputs: qkv (B rows of (H + 2 KV) * D), qn / kn (the q and k norm weights, D each; unread
// without NORM), pos (int32: the position of each row, or one for all when PB = 0), inv_freq
// (D / 2 float32 inverse frequencies: the default, linear, llama3 or yarn table).
// Outputs: q (B, H, D), k (B, KV, D), v (B, KV, D).
// One simdgroup per (row, head); lane l owns the pairs (i, i + D/2) for i = l, l + 32, ...
// Template constants: T, H, KV, D, NORM, PB, EPS and SCALE (float32 bits), HPT (heads per
// threadgroup). (nvcc reports a 32-byte stack: sinf/cosf's slow path for huge angles.)
// With QK_CACHE 1 (qk_rope_cache.h) k and v go straight into the cache buffers instead.
#ifndef QK_CACHE
#define QK_CACHE 0
#endif
//// BODY
constexpr int NH = H + 2 * KV;
constexpr int HALF = D / 2;
constexpr int P = HALF / 32;  // pairs per lane
const int head = int(tg_x) * HPT + int(simd_id);
const int b = int(tg_y);
if (head < NH) {
  const KDEV T* src = qkv + (size_t(b) * NH + head) * D;
  float x1[P], x2[P];
  KUNROLL for (int p = 0; p < P; ++p) {
    x1[p] = float(src[lane + 32 * p]);
    x2[p] = float(src[HALF + lane + 32 * p]);
  }
#if QK_CACHE
  // row pos of each (sequence, kv head) in the buffers, inputs MLX treats as read-only: the
  // caller (models/cache.py KVCacheTrace) owns every row from pos on, and what reads them next
  // (the attention) takes q, so it runs after this launch
  const size_t cache_row = size_t(pos[0]) * D;
  const size_t head_rows = size_t(cap[0]) * D;
  KDEV T* krow = const_cast<KDEV T*>(kcache) + cache_row;
  KDEV T* vrow = const_cast<KDEV T*>(vcache) + cache_row;
#endif
  if (head >= H + KV) {  // v: copied out as it is
#if QK_CACHE
    KDEV T* dst = vrow + (size_t(b) * KV + (head - H - KV)) * head_rows;
#else
    KDEV T* dst = v + (size_t(b) * KV + (head - H - KV)) * D;
#endif
    KUNROLL for (int p = 0; p < P; ++p) {
      dst[lane + 32 * p] = static_cast<T>(x1[p]);
      dst[HALF + lane + 32 * p] = static_cast<T>(x2[p]);
    }
  } else {
    const bool is_q = head < H;
    if (NORM) {  // rounded to T as the separate norm's output was
      float ss = 0.0f;
      KUNROLL for (int p = 0; p < P; ++p) ss += x1[p] * x1[p] + x2[p] * x2[p];
      const float inv = k_rsqrt(k_simd_sum(ss) / float(D) + k_as_float(uint32_t(EPS)));
      const KDEV T* wn = is_q ? qn : kn;
      KUNROLL for (int p = 0; p < P; ++p) {
        x1[p] = float(static_cast<T>(float(wn[lane + 32 * p]) * (x1[p] * inv)));
        x2[p] = float(static_cast<T>(float(wn[HALF + lane + 32 * p]) * (x2[p] * inv)));
      }
    }
    const float scale = k_as_float(uint32_t(SCALE));
    const float t = float(pos[PB ? b : 0]);
#if QK_CACHE
    KDEV T* dst = is_q ? q + (size_t(b) * H + head) * D
                       : krow + (size_t(b) * KV + head - H) * head_rows;
#else
    KDEV T* dst = is_q ? q + (size_t(b) * H + head) * D : k + (size_t(b) * KV + head - H) * D;
#endif
    KUNROLL for (int p = 0; p < P; ++p) {
      const float a = t * inv_freq[lane + 32 * p];
      const float c = k_cos(a), s = k_sin(a);
      const float u = x1[p] * scale, w2 = x2[p] * scale;
      dst[lane + 32 * p] = static_cast<T>(u * c - w2 * s);
      dst[HALF + lane + 32 * p] = static_cast<T>(w2 * c + u * s);
    }
  }
}
