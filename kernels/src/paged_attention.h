// paged attention, decode, split-K over the context ("flash decoding"), first pass.
//
// One threadgroup of NT threads per (context partition of NT tokens, sequence b, kv head,
// chunk of GC of its G query heads): tg_x = partition, tg_y = (b * KVH + kv head) * NHC + chunk.
// Each thread owns one token of the partition: it finds the token's cache row through the
// block table, reads the key row with 16-byte loads and scores it against the chunk's query
// heads, which sit pre-scaled (scale * log2 e) in threadgroup memory, so one key load serves
// the whole GQA group. Softmax statistics of the partition (max, sum of exp2) come from
// simdgroup reductions; the probabilities go to threadgroup memory. For p @ V the threads
// re-split: TPR = DV / 4 threads cover a value row (4 columns each), R = NT / TPR row groups
// take every R-th token, and the groups' partial sums meet in threadgroup memory (reusing the
// query area). The partition writes its unnormalised output and (max, sum) in float32;
// paged_attention_reduce.h combines the partitions.
//
// Caches: key_cache (num_blocks, KVH, BS, DK), value rows of VS elements (VS = DV for a value
// cache, VS = DK for an MLA latent cache where value_cache is the key cache and the values are
// the first DV columns). meta = [max_blocks, partitions, bits of scale * log2 e, block size
// when BS = 0, ...]. BS = 0 reads the block size at run time: a KVCache buffer (B, KVH,
// capacity, D) is one block per sequence, and its capacity grows without a new kernel.
// Template constants: T, XK (0 float32, 1 float16, 2 bfloat16), DK, DV, VS, BS, KVH, G, GC,
// NHC, NT.
//// INCLUDE attn_common.h
//// BODY
constexpr int NW = NT / 32;
constexpr int EPV = (XK == 0) ? 4 : 8;                // elements per 16-byte key load
constexpr int TPR = DV / 4;                            // threads per value row
constexpr int R = (NT / TPR) > 0 ? (NT / TPR) : 1;     // value rows in flight
constexpr int SQW = (DK > R * DV) ? DK : R * DV;
constexpr float NEG = -1.0e30f;
// loads in flight per thread: more where a thread's chain of dependent loads is long
constexpr int UK = ((DK / EPV) % 8 == 0 && DK / EPV >= 32) ? 8 : 4;  // 16-byte key loads
constexpr int UV = (R >= 4) ? 4 : 8;                                 // value rows

KSHARED float4 q4_sh[GC * SQW / 4];   // queries, later the p @ V partial sums
KSHARED float p_sh[GC * NT];
KSHARED float red_sh[2 * NW * GC];
KSHARED uint32_t row_sh[NT];

const int part = int(tg_x);
const int hc = int(tg_y) % NHC;
const int kvh = (int(tg_y) / NHC) % KVH;
const int b = int(tg_y) / (NHC * KVH);
const int MB = meta[0];
const int NP = meta[1];
const float qscale = k_as_float(uint32_t(meta[2]));
const int bs = (BS > 0) ? BS : meta[3];
constexpr int NH = KVH * G;
int ctx = context_lens[b];
ctx = (ctx < MB * bs) ? ctx : MB * bs;
const int t0 = part * NT;
const int h0 = kvh * G + hc * GC;                      // first query head of the chunk
const int ng = (G - hc * GC < GC) ? (G - hc * GC) : GC;  // heads in the chunk

if (t0 >= ctx) {  // a partition past this sequence's context (uniform in the threadgroup)
  k_empty_partition(part_o, part_ml, size_t(b) * NH + h0, ng, NP, part, DV, NT, int(tid), NEG);
  return;
}

for (int i = int(tid); i < GC * DK / 4; i += NT) {
  const int g = (4 * i) / DK;
  float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (g < ng) {
    const KDEV T* qp = queries + (size_t(b) * NH + h0 + g) * DK + (4 * i) % DK;
    KUNROLL for (int k = 0; k < 4; ++k) v[k] = float(qp[k]) * qscale;
  }
  q4_sh[i] = k_float4(v[0], v[1], v[2], v[3]);
}
const int t = t0 + int(tid);
const bool valid = t < ctx;
uint32_t row = 0;
if (valid) {
  const int blk = block_tables[size_t(b) * MB + t / bs];
  row = (uint32_t(blk) * KVH + uint32_t(kvh)) * uint32_t(bs) + uint32_t(t % bs);
}
row_sh[tid] = row;
KBARRIER();

// scores (log2 domain) of this thread's token for every head of the chunk
float s[GC];
KUNROLL for (int g = 0; g < GC; ++g) s[g] = 0.0f;
if (valid) {
  // DK % 32 == 0, so DK / EPV is a multiple of UK
  const KDEV uint4* kp = (const KDEV uint4*)(key_cache + size_t(row) * DK);
  for (int c0 = 0; c0 < DK / EPV; c0 += UK) {
    uint4 u[UK];
    KUNROLL for (int k = 0; k < UK; ++k) u[k] = kp[c0 + k];
    KUNROLL for (int k = 0; k < UK; ++k) {
      float kf[8];
      k_unpack16<XK>(u[k], kf);
      const int d0 = (c0 + k) * EPV;
      KUNROLL for (int g = 0; g < GC; ++g) {
        KUNROLL for (int j4 = 0; j4 < EPV / 4; ++j4) {
          const float4 qv = q4_sh[(g * DK + d0) / 4 + j4];  // one broadcast 16-byte load
          s[g] = k_fma(qv.x, kf[4 * j4], s[g]);
          s[g] = k_fma(qv.y, kf[4 * j4 + 1], s[g]);
          s[g] = k_fma(qv.z, kf[4 * j4 + 2], s[g]);
          s[g] = k_fma(qv.w, kf[4 * j4 + 3], s[g]);
        }
      }
    }
  }
}

// softmax statistics of the partition
float m[GC];
float l[GC];
KUNROLL for (int g = 0; g < GC; ++g) {
  const float wm = k_simd_max(valid ? s[g] : NEG);
  if (lane == 0) red_sh[simd_id * GC + g] = wm;
}
KBARRIER();
KUNROLL for (int g = 0; g < GC; ++g) {
  float mm = NEG;
  for (int w = 0; w < NW; ++w) {
    const float x = red_sh[w * GC + g];
    mm = (x > mm) ? x : mm;
  }
  m[g] = mm;
  const float p = valid ? k_exp2(s[g] - mm) : 0.0f;
  p_sh[g * NT + int(tid)] = p;
  const float ws = k_simd_sum(p);
  if (lane == 0) red_sh[(NW + simd_id) * GC + g] = ws;
}
KBARRIER();
KUNROLL for (int g = 0; g < GC; ++g) {
  float ll = 0.0f;
  for (int w = 0; w < NW; ++w) ll += red_sh[(NW + w) * GC + g];
  l[g] = ll;
}

// p @ V: thread (r, cc) takes columns 4cc..4cc+3 of tokens r, r + R, ...
const int ntok = (ctx - t0 < NT) ? (ctx - t0) : NT;
const int r = int(tid) / TPR;
const int cc = int(tid) % TPR;
float acc[GC][4];
KUNROLL for (int g = 0; g < GC; ++g) {
  KUNROLL for (int i = 0; i < 4; ++i) acc[g][i] = 0.0f;
}
if (r < R) {
  for (int j0 = r; j0 < ntok; j0 += UV * R) {
    // UV value rows in flight per thread; slots past the partition's tokens re-read token
    // r's row (a valid address: row_sh holds 0 for tokens past the context) with weight 0
    float vf[UV][4];
    float pw[UV];
    KUNROLL for (int k = 0; k < UV; ++k) {
      const int j = j0 + k * R;
      const bool ok = j < ntok;
      pw[k] = ok ? 1.0f : 0.0f;
      const KDEV T* vp = value_cache + size_t(row_sh[ok ? j : r]) * VS + cc * 4;
      if (XK == 0) {
        const uint4 u = *((const KDEV uint4*)vp);
        vf[k][0] = k_as_float(u.x); vf[k][1] = k_as_float(u.y);
        vf[k][2] = k_as_float(u.z); vf[k][3] = k_as_float(u.w);
      } else {
        const uint2 u = *((const KDEV uint2*)vp);
        const float2 a = (XK == 1) ? k_f16x2(u.x) : k_bf16x2(u.x);
        const float2 c2 = (XK == 1) ? k_f16x2(u.y) : k_bf16x2(u.y);
        vf[k][0] = a.x; vf[k][1] = a.y; vf[k][2] = c2.x; vf[k][3] = c2.y;
      }
    }
    KUNROLL for (int k = 0; k < UV; ++k) {
      const int j = (j0 + k * R < ntok) ? j0 + k * R : r;
      KUNROLL for (int g = 0; g < GC; ++g) {
        const float pj = pw[k] * p_sh[g * NT + j];
        KUNROLL for (int i = 0; i < 4; ++i) acc[g][i] = k_fma(pj, vf[k][i], acc[g][i]);
      }
    }
  }
}

if (R > 1) {
  // q4_sh is free: its last reads came before the two barriers above
  if (r < R) {
    KUNROLL for (int g = 0; g < GC; ++g) {
      q4_sh[(r * GC + g) * TPR + cc] = k_float4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
    }
  }
  KBARRIER();
  for (int idx = int(tid); idx < ng * TPR; idx += NT) {
    const int g = idx / TPR;
    const int c4 = idx % TPR;
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int rr = 0; rr < R; ++rr) {
      const float4 x = q4_sh[(rr * GC + g) * TPR + c4];
      o[0] += x.x; o[1] += x.y; o[2] += x.z; o[3] += x.w;
    }
    KDEV float* dst = part_o + ((size_t(b) * NH + h0 + g) * NP + part) * DV + c4 * 4;
    KUNROLL for (int k = 0; k < 4; ++k) dst[k] = o[k];
  }
} else if (r < R) {
  KUNROLL for (int g = 0; g < GC; ++g) {
    if (g < ng) {
      KUNROLL for (int i = 0; i < 4; ++i) {
        part_o[((size_t(b) * NH + h0 + g) * NP + part) * DV + cc * 4 + i] = acc[g][i];
      }
    }
  }
}
if (tid == 0) {
  KUNROLL for (int g = 0; g < GC; ++g) {
    if (g < ng) {
      const size_t o = ((size_t(b) * NH + h0 + g) * NP + part) * 2;
      part_ml[o] = m[g];
      part_ml[o + 1] = l[g];
    }
  }
}
