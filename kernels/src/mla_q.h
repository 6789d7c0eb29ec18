// mla_q: the query and cache row of one MLA (DeepSeek-V2 / GLM-4.7-Flash) decode token, one
// launch. Inputs: x, the q_b projection (H heads of XH = NOPE + ROPE values); w/scales/biases,
// `embed_q` (H matrices of RH = kv_lora_rank rows by K = NOPE, affine); kv, the row of the
// fused q_a | kv_a projection (the latent starts at QA, its RH values then ROPE rope-key
// values); kvn, the kv_a RMSNorm weight; pos (int32, one); inv_freq (ROPE / 2 float32).
// Outputs: y (H rows of YH = RH + ROPE): each head's no-rope query folded into latent space
// (the GEMV threadgroups, HEADS = 1) then its rope query rotated; kvrow (YH): the normed
// latent then the rotated rope key, the row the latent cache appends.
// RoPE is interleaved (pairs (2i, 2i + 1)) with the inputs scaled by SCALE first; the latent's
// RMSNorm output is rounded to T as the separate norm's was. Threadgroups past the NTG of the
// GEMV each take one tail job: head t < H's rope query, or (t = H) the cache row.
// Template constants as qmv plus XH, RH, YH, H, NTG, QA, EPS and SCALE (float32 bits).
// With MLA_Q_CACHE 1 (mla_q_cache.h) the row goes straight into the latent cache instead.
//// INCLUDE quant_common.h
#ifndef MLA_Q_CACHE
#define MLA_Q_CACHE 0
#endif
#define HEADS 1
#define QXH XH
#define QRH RH
#define QYH YH
//// BODY
if (int(tg_x) >= NTG) {
  if (simd_id != 0) return;
  constexpr int ROPE = YH - RH;
  const int t = int(tg_x) - NTG;
  const float p = float(pos[0]);
  const float scale = k_as_float(uint32_t(SCALE));
#if MLA_Q_CACHE
  // row pos of the cache (1, 1, capacity, YH), an input MLX treats as read-only: the caller
  // (models/mla_cache.py MLACacheTrace) owns every row from pos on, and what reads the row
  // next (the attention) takes y, so it runs after this launch
  KDEV T* kvrow = const_cast<KDEV T*>(cache) + size_t(pos[0]) * YH;
#endif
  const KDEV T* src = (t < H) ? x + size_t(t) * XH + K : kv + QA + RH;
  KDEV T* dst = (t < H) ? y + size_t(t) * YH + RH : kvrow + RH;
  for (int i = int(lane); i < ROPE / 2; i += 32) {
    const float a = p * inv_freq[i];
    const float c = k_cos(a), s = k_sin(a);
    const float u = float(src[2 * i]) * scale, v = float(src[2 * i + 1]) * scale;
    dst[2 * i] = static_cast<T>(u * c - v * s);
    dst[2 * i + 1] = static_cast<T>(v * c + u * s);
  }
  if (t == H) {  // the latent's RMSNorm
    const KDEV T* lat = kv + QA;
    float ss = 0.0f;
    for (int i = int(lane); i < RH; i += 32) {
      const float v = float(lat[i]);
      ss = k_fma(v, v, ss);
    }
    const float inv = k_rsqrt(k_simd_sum(ss) / float(RH) + k_as_float(uint32_t(EPS)));
    for (int i = int(lane); i < RH; i += 32)
      kvrow[i] = static_cast<T>(float(kvn[i]) * (float(lat[i]) * inv));
  }
  return;
}
//// INCLUDE qmv_core.h
