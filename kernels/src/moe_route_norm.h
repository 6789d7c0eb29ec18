// moe_route_norm: a MoE layer's input RMSNorm, its float32 router GEMV and the routing, one
// threadgroup of NTH threads per token, for a decode step (GLM-4.7-Flash's sigmoid router).
// Inputs: h (tokens, D) the residual stream; nw (D) the norm weight; gw (E, D) the router
// weight (GT: float32, or the activations' 16-bit type where the float32 weight is exactly
// that type's values); bias (E) float32. Outputs: xn (tokens, D) the normed input the experts
// take, rounded as MLX's rms_norm rounds it (T(w * T(x / rms))); inds and weights as
// moe_router.h's.
// What it replaces: rms_norm, a cast to float32, the GEMV and the router (four to six
// launches per layer per token). The logits are float32 dot products of the rounded normed
// input with the weight rows, as transformers computes them; simdgroup w takes rows w,
// w + NTH / 32, ... Then every simdgroup runs the routing (moe_route_core.h) on the logits in
// threadgroup memory and simdgroup 0 writes.
// Template constants: T, GT, D, NTH, EPS (float32 bits), and moe_router.h's E, TOPK, SOFTMAX,
// HAS_BIAS, NGRP, TOPKG, NORM, RSF.
//// BODY
constexpr int NW = NTH / 32;
KSHARED float x_sh[D];
KSHARED float lg_sh[E];
KSHARED float red_sh[NW];
const int t = int(tg_y);
const KDEV T* hp = h + size_t(t) * D;
float ss = 0.0f;
for (int i = int(tid); i < D; i += NTH) {
  const float v = float(hp[i]);
  x_sh[i] = v;
  ss += v * v;
}
ss = k_simd_sum(ss);
if (lane == 0) red_sh[simd_id] = ss;
KBARRIER();
float tot = 0.0f;
for (int w = 0; w < NW; ++w) tot += red_sh[w];
const float inv = k_rsqrt(tot / float(D) + k_as_float(uint32_t(EPS)));
for (int i = int(tid); i < D; i += NTH) {
  const T o = static_cast<T>(float(nw[i]) * float(static_cast<T>(x_sh[i] * inv)));
  xn[size_t(t) * D + i] = o;
  x_sh[i] = float(o);
}
KBARRIER();
for (int e = int(simd_id); e < E; e += NW) {
  const KDEV GT* wr = gw + size_t(e) * D;
  float acc = 0.0f;
  KUNROLL for (int i0 = 0; i0 < D; i0 += 128) {  // D % 4 == 0: four weights per lane a step
    const int i = i0 + 4 * int(lane);
    if (i < D) {
      float wf[4];
      if (sizeof(GT) == 4) {
        const float4 u = *((const KDEV float4*)(wr + i));
        wf[0] = u.x; wf[1] = u.y; wf[2] = u.z; wf[3] = u.w;
      } else {
        const uint2 u = *((const KDEV uint2*)(wr + i));
        const float2 a = (XK == 1) ? k_f16x2(u.x) : k_bf16x2(u.x);
        const float2 c = (XK == 1) ? k_f16x2(u.y) : k_bf16x2(u.y);
        wf[0] = a.x; wf[1] = a.y; wf[2] = c.x; wf[3] = c.y;
      }
      KUNROLL for (int j = 0; j < 4; ++j) acc = k_fma(wf[j], x_sh[i + j], acc);
    }
  }
  acc = k_simd_sum(acc);
  if (lane == 0) lg_sh[e] = acc;
}
KBARRIER();
#define ROUTER_LOGIT(e) lg_sh[e]
#define ROUTER_WRITES (simd_id == 0)
//// INCLUDE moe_route_core.h
