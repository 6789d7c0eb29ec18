// flash_prefill: causal attention o = softmax(scale * q k^T) v for many queries on tensor cores,
// in one pass over the keys (online softmax), for head sizes MLX's CUDA attention does not fuse
// (query/key or value heads over 128: GLM-4.7-Flash's prefill has 256 and 256).
//
// Layout: q (B, H, L, D), k (B, HK, S, D), v (B, HK, S, DV), o (B, H, L, DV), row-contiguous;
// query i sees keys j <= i + S - L (the last query is aligned with the last key, as a prefill
// after cached tokens needs). `meta` holds L and S, `scale` the softmax scale times log2(e).
//
// Work: a threadgroup takes 64 queries of one head and DVB of its DV output columns; each of
// its 4 simdgroups owns 16 query rows. Per block of 32 keys the threadgroup stages K (32 x D)
// and V transposed (DVB x 32) in threadgroup memory; a simdgroup computes its 16 x 32 scores
// with m16n8k16 products (its q rows stay in registers as A fragments), updates the running
// row max and sum, and multiplies the probabilities (rounded to T, the C fragments reused as
// A fragments) into its 16 x DVB float accumulator. Padded rows (+8 halves) keep the fragment
// loads free of bank conflicts.
//
// Template constants: T (q, k, v, o), XK (1 float16, 2 bfloat16), D, DV, DVB (D a multiple of
// 16, DV of DVB, DVB of 8), H, HK (H a multiple of HK).
//// BODY
constexpr int BQ = 64;                 // queries per threadgroup
constexpr int BK = 32;                 // keys per block
constexpr int NW = 4;                  // simdgroups
constexpr int DS = D / 16;             // k-steps of q k^T
constexpr int KT = BK / 8;             // score tiles (8 keys each) per block
constexpr int VT = DVB / 8;            // output tiles (8 columns each)
constexpr int KW2 = (D + 8) / 2;       // words per staged key row
constexpr int VW = (BK + 8) / 2;       // words per staged value column
constexpr int NDV = DV / DVB;
constexpr float NEG = -1.0e30f;

KSHARED uint32_t ks[BK * KW2];
KSHARED uint32_t vt[DVB * VW];

const int L = meta[0];
const int S = meta[1];
const float sl2 = scale[0];
const int g = int(lane) >> 2;
const int c = int(lane) & 3;
const int nqb = (L + BQ - 1) / BQ;
const int qb = nqb - 1 - int(tg_x);    // the longest rows first
const int dvc = int(tg_y) % NDV;
const int bh = int(tg_y) / NDV;
const int h = bh % H;
const int b = bh / H;
const int hk = h / (H / HK);
const int shift = S - L;
const KDEV T* qp = q + (size_t(b) * H + h) * size_t(L) * D;
const KDEV T* kp = k + (size_t(b) * HK + hk) * size_t(S) * D;
const KDEV T* vp = v + (size_t(b) * HK + hk) * size_t(S) * DV + dvc * DVB;
KDEV T* op = o + (size_t(b) * H + h) * size_t(L) * DV + dvc * DVB;

const int r0 = qb * BQ + int(simd_id) * 16 + g;  // this lane's rows: r0 and r0 + 8
const int r1 = r0 + 8;
const int r0c = r0 < L ? r0 : L - 1;
const int r1c = r1 < L ? r1 : L - 1;

uint32_t qa[DS][4];
KUNROLL for (int s = 0; s < DS; ++s) {
  qa[s][0] = *((const KDEV uint32_t*)(qp + size_t(r0c) * D + 16 * s + 2 * c));
  qa[s][1] = *((const KDEV uint32_t*)(qp + size_t(r1c) * D + 16 * s + 2 * c));
  qa[s][2] = *((const KDEV uint32_t*)(qp + size_t(r0c) * D + 16 * s + 2 * c + 8));
  qa[s][3] = *((const KDEV uint32_t*)(qp + size_t(r1c) * D + 16 * s + 2 * c + 8));
}

float oacc[VT][4];
KUNROLL for (int t = 0; t < VT; ++t) {
  KUNROLL for (int i = 0; i < 4; ++i) oacc[t][i] = 0.0f;
}
float m0 = NEG, m1 = NEG, l0 = 0.0f, l1 = 0.0f;

const int last_row = (qb * BQ + BQ - 1 < L - 1) ? qb * BQ + BQ - 1 : L - 1;
const int kend = (last_row + shift + 1 < S) ? last_row + shift + 1 : S;
const int warp_last = int(simd_id) * 16 + qb * BQ + 15 + shift;  // its last row's last key
for (int kb = 0; kb < kend; kb += BK) {
  KBARRIER();  // the previous block's tiles are consumed
  for (int i = int(tid); i < BK * D / 8; i += 32 * NW) {
    const int r = i / (D / 8), cc = i % (D / 8);
    uint4 val = k_uint4(0u, 0u, 0u, 0u);
    if (kb + r < S) val = *((const KDEV uint4*)(kp + size_t(kb + r) * D + cc * 8));
    const int w0 = r * KW2 + cc * 4;
    ks[w0] = val.x;
    ks[w0 + 1] = val.y;
    ks[w0 + 2] = val.z;
    ks[w0 + 3] = val.w;
  }
  // V transposed: a word holds one column's values of keys 2j and 2j + 1
  for (int i = int(tid); i < (BK / 2) * (DVB / 8); i += 32 * NW) {
    const int j = i % (BK / 2), cc = i / (BK / 2);
    uint4 va = k_uint4(0u, 0u, 0u, 0u), vb = k_uint4(0u, 0u, 0u, 0u);
    if (kb + 2 * j < S) va = *((const KDEV uint4*)(vp + size_t(kb + 2 * j) * DV + cc * 8));
    if (kb + 2 * j + 1 < S) vb = *((const KDEV uint4*)(vp + size_t(kb + 2 * j + 1) * DV + cc * 8));
    const uint32_t a4[4] = {va.x, va.y, va.z, va.w};
    const uint32_t b4[4] = {vb.x, vb.y, vb.z, vb.w};
    KUNROLL for (int p = 0; p < 4; ++p) {
      vt[(cc * 8 + 2 * p) * VW + j] = (a4[p] & 0xFFFFu) | (b4[p] << 16);
      vt[(cc * 8 + 2 * p + 1) * VW + j] = (a4[p] >> 16) | (b4[p] & 0xFFFF0000u);
    }
  }
  KBARRIER();
  if (kb > warp_last) continue;  // every key of this block is after this simdgroup's rows

  float sacc[KT][4];
  KUNROLL for (int t = 0; t < KT; ++t) {
    KUNROLL for (int i = 0; i < 4; ++i) sacc[t][i] = 0.0f;
  }
  KUNROLL for (int s = 0; s < DS; ++s) {
    KUNROLL for (int t = 0; t < KT; ++t) {
      const uint32_t bf[2] = {ks[(8 * t + g) * KW2 + 8 * s + c], ks[(8 * t + g) * KW2 + 8 * s + c + 4]};
      k_mma16816<XK>(sacc[t], qa[s], bf, lane);
    }
  }
  // scale, mask, running max
  float mx0 = NEG, mx1 = NEG;
  KUNROLL for (int t = 0; t < KT; ++t) {
    KUNROLL for (int jj = 0; jj < 2; ++jj) {
      const int key = kb + 8 * t + 2 * c + jj;
      const bool ok0 = key < S && key <= r0 + shift;
      const bool ok1 = key < S && key <= r1 + shift;
      sacc[t][jj] = ok0 ? sacc[t][jj] * sl2 : NEG;
      sacc[t][2 + jj] = ok1 ? sacc[t][2 + jj] * sl2 : NEG;
      mx0 = sacc[t][jj] > mx0 ? sacc[t][jj] : mx0;
      mx1 = sacc[t][2 + jj] > mx1 ? sacc[t][2 + jj] : mx1;
    }
  }
  KUNROLL for (int sh = 1; sh <= 2; sh *= 2) {
    const float o0 = k_simd_xor(mx0, uint32_t(sh)), o1 = k_simd_xor(mx1, uint32_t(sh));
    mx0 = o0 > mx0 ? o0 : mx0;
    mx1 = o1 > mx1 ? o1 : mx1;
  }
  const float mn0 = mx0 > m0 ? mx0 : m0, mn1 = mx1 > m1 ? mx1 : m1;
  const float cr0 = k_exp2(m0 - mn0), cr1 = k_exp2(m1 - mn1);
  m0 = mn0;
  m1 = mn1;
  float ps0 = 0.0f, ps1 = 0.0f;
  KUNROLL for (int t = 0; t < KT; ++t) {
    KUNROLL for (int jj = 0; jj < 2; ++jj) {
      sacc[t][jj] = sacc[t][jj] > 0.5f * NEG ? k_exp2(sacc[t][jj] - mn0) : 0.0f;
      sacc[t][2 + jj] = sacc[t][2 + jj] > 0.5f * NEG ? k_exp2(sacc[t][2 + jj] - mn1) : 0.0f;
      ps0 += sacc[t][jj];
      ps1 += sacc[t][2 + jj];
    }
  }
  l0 = l0 * cr0 + ps0;  // this lane's share; the four lanes of a row add up at the end
  l1 = l1 * cr1 + ps1;
  KUNROLL for (int t = 0; t < VT; ++t) {
    oacc[t][0] *= cr0;
    oacc[t][1] *= cr0;
    oacc[t][2] *= cr1;
    oacc[t][3] *= cr1;
  }
  KUNROLL for (int u = 0; u < KT / 2; ++u) {
    uint32_t pa[4];
    if (XK == 1) {
      pa[0] = k_pack_f16x2(sacc[2 * u][0], sacc[2 * u][1]);
      pa[1] = k_pack_f16x2(sacc[2 * u][2], sacc[2 * u][3]);
      pa[2] = k_pack_f16x2(sacc[2 * u + 1][0], sacc[2 * u + 1][1]);
      pa[3] = k_pack_f16x2(sacc[2 * u + 1][2], sacc[2 * u + 1][3]);
    } else {
      pa[0] = k_pack_bf16x2(sacc[2 * u][0], sacc[2 * u][1]);
      pa[1] = k_pack_bf16x2(sacc[2 * u][2], sacc[2 * u][3]);
      pa[2] = k_pack_bf16x2(sacc[2 * u + 1][0], sacc[2 * u + 1][1]);
      pa[3] = k_pack_bf16x2(sacc[2 * u + 1][2], sacc[2 * u + 1][3]);
    }
    KUNROLL for (int t = 0; t < VT; ++t) {
      const uint32_t bf[2] = {vt[(8 * t + g) * VW + 8 * u + c], vt[(8 * t + g) * VW + 8 * u + c + 4]};
      k_mma16816<XK>(oacc[t], pa, bf, lane);
    }
  }
}

KUNROLL for (int sh = 1; sh <= 2; sh *= 2) {
  l0 += k_simd_xor(l0, uint32_t(sh));
  l1 += k_simd_xor(l1, uint32_t(sh));
}
const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
const float inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
KUNROLL for (int t = 0; t < VT; ++t) {
  const int col = 8 * t + 2 * c;
  if (r0 < L) {
    op[size_t(r0) * DV + col] = static_cast<T>(oacc[t][0] * inv0);
    op[size_t(r0) * DV + col + 1] = static_cast<T>(oacc[t][1] * inv0);
  }
  if (r1 < L) {
    op[size_t(r1) * DV + col] = static_cast<T>(oacc[t][2] * inv1);
    op[size_t(r1) * DV + col + 1] = static_cast<T>(oacc[t][3] * inv1);
  }
}
