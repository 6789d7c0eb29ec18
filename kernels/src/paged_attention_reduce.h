// paged attention, second pass: combine the context partitions of paged_attention.h.
// One threadgroup of NT threads per (sequence, query head) row: the partitions' outputs are
// rescaled by exp2(m_p - M) (M the largest partition max, log2 domain) and divided by the
// rescaled sum of their softmax denominators. A row whose partitions are all empty (context
// 0) gets zeros. meta[1] = partitions. Template constants: T (output), DV, NT.
//// BODY
const int rowi = int(tg_x);
const int NP = meta[1];
const KDEV float* ml = part_ml + size_t(rowi) * NP * 2;
float M = -1.0e30f;
for (int p = 0; p < NP; ++p) {
  const float x = ml[2 * p];
  M = (x > M) ? x : M;
}
float L = 0.0f;
for (int p = 0; p < NP; ++p) L += k_exp2(ml[2 * p] - M) * ml[2 * p + 1];
const float inv = (L > 0.0f) ? 1.0f / L : 0.0f;
for (int col = int(tid); col < DV; col += NT) {
  float o = 0.0f;
  for (int p = 0; p < NP; ++p) {
    o += k_exp2(ml[2 * p] - M) * part_o[(size_t(rowi) * NP + p) * DV + col];
  }
  out[size_t(rowi) * DV + col] = static_cast<T>(o * inv);
}
