// paged attention over an MLA latent cache, decode, split-K first pass (paged_attention.h's
// outputs, combined by paged_attention_reduce.h).
//
// An MLA cache has one "kv head" that every query head reads: rows of DK = rank + rope values
// (GLM-4.7-Flash: 576), whose first DV (512) are also the values. paged_attention.h gives each
// thread one token, so a batch-1 decode over a short context ran on a handful of 128-thread
// threadgroups whose threads each walked the whole partition serially (36 us a layer at 128
// tokens on the H200). Here a threadgroup of NTH threads takes NTOK tokens (a partition) and GC
// query heads (a chunk), and splits the work three ways:
//   1. scores: LPT lanes per token, each lane a strided set of the row's 16-byte chunks against
//      the chunk's queries (float32, pre-scaled by scale * log2 e, in threadgroup memory), then
//      a butterfly over the LPT lanes; scores go to threadgroup memory;
//   2. softmax statistics: one simdgroup per head, over the partition's tokens;
//   3. p @ V: each thread owns column pairs of the value row and walks the tokens, with the
//      probabilities broadcast from threadgroup memory.
// Small NTOK and GC put many threadgroups on one sequence; the host picks them (paged_attention
// `_plan_mla`). Grid: tg_x = partition, tg_y = b * NHC + head chunk.
// Template constants: T, XK (0 float32, 1 float16, 2 bfloat16), DK, DV, BS, NH, GC, NHC, NTOK,
// LPT, NTH. meta = [max_blocks, partitions, bits of scale * log2 e, ...].
//// INCLUDE attn_common.h
//// BODY
constexpr int NW = NTH / 32;
constexpr int EPV = (XK == 0) ? 4 : 8;            // elements per 16-byte load
constexpr int NCH = DK / EPV;                      // 16-byte chunks per row
constexpr int CPL = (NCH + LPT - 1) / LPT;         // chunks per lane
constexpr int TPP = NTH / LPT;                     // tokens scored at once by the threadgroup
constexpr int NPAIR = DV / 2;                      // value column pairs
constexpr int KP = (NPAIR + NTH - 1) / NTH;        // column pairs per thread
constexpr int UV = 8;                              // value rows in flight per thread
constexpr float NEG = -1.0e30f;

KSHARED float4 q4_sh[GC * DK / 4];
KSHARED float s_sh[GC * NTOK];
KSHARED uint32_t row_sh[NTOK];

const int part = int(tg_x);
const int hc = int(tg_y) % NHC;
const int b = int(tg_y) / NHC;
const int MB = meta[0];
const int NP = meta[1];
const float qscale = k_as_float(uint32_t(meta[2]));
int ctx = context_lens[b];
ctx = (ctx < MB * BS) ? ctx : MB * BS;
const int t0 = part * NTOK;
const int h0 = hc * GC;
const int ng = (NH - h0 < GC) ? (NH - h0) : GC;

if (t0 >= ctx) {  // past this sequence's context (uniform in the threadgroup)
  k_empty_partition(part_o, part_ml, size_t(b) * NH + h0, ng, NP, part, DV, NTH, int(tid), NEG);
  return;
}
const int ntok = (ctx - t0 < NTOK) ? (ctx - t0) : NTOK;

for (int i = int(tid); i < GC * DK / 4; i += NTH) {
  const int g = (4 * i) / DK;
  float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (g < ng) {
    const KDEV T* qp = queries + (size_t(b) * NH + h0 + g) * DK + (4 * i) % DK;
    KUNROLL for (int k = 0; k < 4; ++k) v[k] = float(qp[k]) * qscale;
  }
  q4_sh[i] = k_float4(v[0], v[1], v[2], v[3]);
}
for (int j = int(tid); j < NTOK; j += NTH) {
  uint32_t row = 0;  // tokens past the context read row 0 of block 0 (a valid address)
  if (j < ntok) {
    const int t = t0 + j;
    row = uint32_t(block_tables[size_t(b) * MB + t / BS]) * BS + uint32_t(t % BS);
  }
  row_sh[j] = row;
}
KBARRIER();

// 1. scores, log2 domain: lane sub = tid % LPT of token group tid / LPT
// The loop bound is uniform (NTOK % TPP == 0), so every lane of a simdgroup takes part in
// the butterfly; lanes past the partition's tokens score row 0 and keep nothing.
const int sub = int(tid) % LPT;
for (int jb = 0; jb < ntok; jb += TPP) {
  const int j = jb + int(tid) / LPT;
  const KDEV uint4* kp = (const KDEV uint4*)(cache + size_t(row_sh[j]) * DK);
  uint4 u[CPL];
  KUNROLL for (int i = 0; i < CPL; ++i) {
    const int c = sub + i * LPT;
    u[i] = (c < NCH) ? kp[c] : k_uint4(0u, 0u, 0u, 0u);
  }
  float s[GC];
  KUNROLL for (int g = 0; g < GC; ++g) s[g] = 0.0f;
  KUNROLL for (int i = 0; i < CPL; ++i) {
    const int c = sub + i * LPT;
    if (c < NCH) {
      float kf[8];
      k_unpack16<XK>(u[i], kf);
      KUNROLL for (int g = 0; g < GC; ++g) {
        KUNROLL for (int j4 = 0; j4 < EPV / 4; ++j4) {
          const float4 qv = q4_sh[(g * DK + c * EPV) / 4 + j4];
          s[g] = k_fma(qv.x, kf[4 * j4], s[g]);
          s[g] = k_fma(qv.y, kf[4 * j4 + 1], s[g]);
          s[g] = k_fma(qv.z, kf[4 * j4 + 2], s[g]);
          s[g] = k_fma(qv.w, kf[4 * j4 + 3], s[g]);
        }
      }
    }
  }
  KUNROLL for (int g = 0; g < GC; ++g) {
    KUNROLL for (int m = 1; m < LPT; m <<= 1) s[g] += k_simd_xor(s[g], uint32_t(m));
  }
  KUNROLL for (int g = 0; g < GC; ++g) {
    if (g % LPT == sub && j < ntok) s_sh[g * NTOK + j] = s[g];
  }
}
KBARRIER();

// 2. softmax statistics per head; the scores become unnormalised probabilities in place
for (int g = int(simd_id); g < ng; g += NW) {
  float mx_ = NEG;
  for (int j = int(lane); j < ntok; j += 32) mx_ = (s_sh[g * NTOK + j] > mx_) ? s_sh[g * NTOK + j] : mx_;
  mx_ = k_simd_max(mx_);
  float sum = 0.0f;
  for (int j = int(lane); j < ntok; j += 32) {
    const float p = k_exp2(s_sh[g * NTOK + j] - mx_);
    s_sh[g * NTOK + j] = p;
    sum += p;
  }
  sum = k_simd_sum(sum);
  if (lane == 0) {
    const size_t o = ((size_t(b) * NH + h0 + g) * NP + part) * 2;
    part_ml[o] = mx_;
    part_ml[o + 1] = sum;
  }
}
KBARRIER();

// 3. p @ V over the value columns (the first DV of each row), a pair of columns at a time
float acc[KP][GC][2];
KUNROLL for (int k = 0; k < KP; ++k) {
  KUNROLL for (int g = 0; g < GC; ++g) { acc[k][g][0] = 0.0f; acc[k][g][1] = 0.0f; }
}
for (int j0 = 0; j0 < ntok; j0 += UV) {
  KUNROLL for (int k = 0; k < KP; ++k) {
    const int pi = int(tid) + k * NTH;
    if (pi < NPAIR) {
      float vf[UV][2];
      KUNROLL for (int i = 0; i < UV; ++i) {
        // slots past the partition's tokens re-read token j0's row; their weight is zero
        const int j = (j0 + i < ntok) ? j0 + i : j0;
        const KDEV T* vp = cache + size_t(row_sh[j]) * DK + 2 * pi;
        if (XK == 0) {
          vf[i][0] = float(vp[0]);
          vf[i][1] = float(vp[1]);
        } else {
          const float2 f = (XK == 1) ? k_f16x2(*((const KDEV uint32_t*)vp))
                                     : k_bf16x2(*((const KDEV uint32_t*)vp));
          vf[i][0] = f.x;
          vf[i][1] = f.y;
        }
      }
      KUNROLL for (int i = 0; i < UV; ++i) {
        const bool ok = j0 + i < ntok;
        KUNROLL for (int g = 0; g < GC; ++g) {
          const float p = ok ? s_sh[g * NTOK + j0 + i] : 0.0f;
          acc[k][g][0] = k_fma(p, vf[i][0], acc[k][g][0]);
          acc[k][g][1] = k_fma(p, vf[i][1], acc[k][g][1]);
        }
      }
    }
  }
}
KUNROLL for (int k = 0; k < KP; ++k) {
  const int pi = int(tid) + k * NTH;
  if (pi < NPAIR) {
    KUNROLL for (int g = 0; g < GC; ++g) {
      if (g < ng) {
        KDEV float* dst = part_o + ((size_t(b) * NH + h0 + g) * NP + part) * DV + 2 * pi;
        dst[0] = acc[k][g][0];
        dst[1] = acc[k][g][1];
      }
    }
  }
}
