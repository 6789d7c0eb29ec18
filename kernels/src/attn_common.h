// Helpers shared by the paged-attention first passes (paged_attention.h, paged_mla.h).
// One 16-byte load of a cache row as floats: XK 0, four float32 (the other four zero);
// XK 1 / 2, eight float16 / bfloat16.
template <int XK>
KINLINE void k_unpack16(uint4 u, KTHREAD float* kf) {
  if (XK == 0) {
    kf[0] = k_as_float(u.x); kf[1] = k_as_float(u.y);
    kf[2] = k_as_float(u.z); kf[3] = k_as_float(u.w);
    kf[4] = 0.0f; kf[5] = 0.0f; kf[6] = 0.0f; kf[7] = 0.0f;
  } else {
    const uint32_t w4[4] = {u.x, u.y, u.z, u.w};
    KUNROLL for (int i = 0; i < 4; ++i) {
      const float2 f = (XK == 1) ? k_f16x2(w4[i]) : k_bf16x2(w4[i]);
      kf[2 * i] = f.x;
      kf[2 * i + 1] = f.y;
    }
  }
}
// A partition past its sequence's context: zero partial outputs and (max, sum) = (neg, 0) for
// the ng heads from `head` (b * NH + first head) on, so the reduce gives it no weight.
KINLINE void k_empty_partition(KDEV float* part_o, KDEV float* part_ml, size_t head, int ng,
                               int np, int part, int dv, int nth, int tid, float neg) {
  for (int i = tid; i < ng * dv; i += nth) {
    part_o[((head + size_t(i / dv)) * np + part) * dv + i % dv] = 0.0f;
  }
  if (tid < ng) {
    const size_t o = ((head + size_t(tid)) * np + part) * 2;
    part_ml[o] = neg;
    part_ml[o + 1] = 0.0f;
  }
}
