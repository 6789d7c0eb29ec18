// paged attention, second pass: combine the context partitions of paged_attention.h.
// One threadgroup of NT threads per (sequence, query head) row and chunk of NT output columns
// (CH chunks cover DV): tg_x = row * CH + chunk. The partitions' outputs are rescaled by
// exp2(m_p - M) (M the largest partition max, log2 domain) and divided by the rescaled sum of
// their softmax denominators. The threads first share the scan of the partitions' (max, sum)
// (simdgroup then threadgroup reductions), then take NT partitions at a time with their
// weights in threadgroup memory, one column each: a long context (many partitions) is no
// longer one thread's serial chain of exp2 and loads per column, and CH chunks put more
// threadgroups to work for a single sequence. A row whose partitions are all empty
// (context 0) gets zeros. meta[1] = partitions. Template constants: T (output), DV, NT, CH.
//// BODY
constexpr int NW = NT / 32;
KSHARED float red_sh[NW];
KSHARED float w_sh[NT];
const int rowi = int(tg_x) / CH;
const int col = (int(tg_x) % CH) * NT + int(tid);
const int NP = meta[1];
const KDEV float* ml = part_ml + size_t(rowi) * NP * 2;
float M = -1.0e30f;
for (int p = int(tid); p < NP; p += NT) {
  const float x = ml[2 * p];
  M = (x > M) ? x : M;
}
M = k_simd_max(M);
if (lane == 0) red_sh[simd_id] = M;
KBARRIER();
M = red_sh[0];
for (int i = 1; i < NW; ++i) M = (red_sh[i] > M) ? red_sh[i] : M;
KBARRIER();
float L = 0.0f;
for (int p = int(tid); p < NP; p += NT) L += k_exp2(ml[2 * p] - M) * ml[2 * p + 1];
L = k_simd_sum(L);
if (lane == 0) red_sh[simd_id] = L;
KBARRIER();
L = 0.0f;
for (int i = 0; i < NW; ++i) L += red_sh[i];
const float inv = (L > 0.0f) ? 1.0f / L : 0.0f;
const KDEV float* po = part_o + size_t(rowi) * NP * DV + col;
float o = 0.0f;
for (int p0 = 0; p0 < NP; p0 += NT) {
  const int p = p0 + int(tid);
  w_sh[tid] = (p < NP) ? k_exp2(ml[2 * p] - M) : 0.0f;
  KBARRIER();
  const int n = (NP - p0 < NT) ? (NP - p0) : NT;
  if (col < DV) {
    int i = 0;
    for (; i + 4 <= n; i += 4) {  // four independent loads in flight
      const float a0 = po[size_t(p0 + i) * DV];
      const float a1 = po[size_t(p0 + i + 1) * DV];
      const float a2 = po[size_t(p0 + i + 2) * DV];
      const float a3 = po[size_t(p0 + i + 3) * DV];
      o += w_sh[i] * a0 + w_sh[i + 1] * a1 + w_sh[i + 2] * a2 + w_sh[i + 3] * a3;
    }
    for (; i < n; ++i) o += w_sh[i] * po[size_t(p0 + i) * DV];
  }
  KBARRIER();
}
if (col < DV) out[size_t(rowi) * DV + col] = static_cast<T>(o * inv);
