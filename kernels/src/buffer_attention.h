// buffer attention, decode: queries of one token per sequence against KVCache buffers keys /
// values (B, KVH, capacity, D), sequence b attending to its first context_lens[b] rows.
//
// Built for few sequences (batch-1 decode): one threadgroup of NW warps takes a partition of
// the context of one (sequence, kv head). Lane l owns the E = D / 32 columns l * E ... of every
// row, so a warp reads a row with one load per lane; it takes chunks of TPW rows (chunk c of
// warp w starts at token (c * NW + w) * TPW of the partition, so a short context still spreads
// over all warps) and issues a chunk's TPW key and TPW value rows at once. The G query heads of
// the kv head sit in registers, pre-scaled by scale * log2 e: one key load serves the whole
// GQA group. Scores are summed across the lanes (simdgroup sums); each warp keeps an online
// softmax over its chunks (running max, sum and p @ V), and the warps' results meet in
// threadgroup memory, rescaled to the partition's max.
// ONE = 0: split-K ("flash decoding"): the partition writes unnormalised float32 rows part_o
//   (B, NH, NP, D) and (max, sum) part_ml in the log2 domain, as paged_attention.h, and
//   paged_attention_reduce.h combines the partitions.
// ONE = 1 (buffer_attention_one.h): one partition covers the context and writes the output.
//
// meta = [chunks per warp, partitions NP, bits of scale * log2 e, capacity, ...].
// Template constants: T, XK (0 float32, 1 float16, 2 bfloat16), D, KVH, G, NW, TPW.
#ifndef ONE
#define ONE 0
#endif
//// INCLUDE attn_common.h
// W 32-bit words from p (W = 1, 2, 4 or 8; p aligned to 4 * W bytes, or 16 for W = 8)
template <int W>
KINLINE void k_load_words(const KDEV uint32_t* p, KTHREAD uint32_t* w) {
  if (W == 1) {
    w[0] = p[0];
  } else if (W == 2) {
    const uint2 u = *((const KDEV uint2*)p);
    w[0] = u.x; w[1] = u.y;
  } else {
    KUNROLL for (int j = 0; j < W / 4; ++j) {
      const uint4 u = *((const KDEV uint4*)(p + 4 * j));
      w[4 * j] = u.x; w[4 * j + 1] = u.y; w[4 * j + 2] = u.z; w[4 * j + 3] = u.w;
    }
  }
}
// the E values of W words (XK 0: one float a word; 1 / 2: two float16 / bfloat16 a word)
template <int XK, int W>
KINLINE void k_words_to_floats(KTHREAD const uint32_t* w, KTHREAD float* f) {
  KUNROLL for (int j = 0; j < W; ++j) {
    if (XK == 0) {
      f[j] = k_as_float(w[j]);
    } else {
      const float2 v = (XK == 1) ? k_f16x2(w[j]) : k_bf16x2(w[j]);
      f[2 * j] = v.x;
      f[2 * j + 1] = v.y;
    }
  }
}
//// BODY
constexpr int NT = NW * 32;
constexpr int E = D / 32;                      // columns per lane
constexpr int W = (XK == 0) ? E : E / 2;       // 32-bit words per lane and row
constexpr int NH = KVH * G;
constexpr float NEG = -1.0e30f;

KSHARED float acc_sh[NW * G * D];
KSHARED float red_sh[2 * NW * G];

const int part = int(tg_x);
const int b = int(tg_y) / KVH;
const int kvh = int(tg_y) % KVH;
const int CPW = meta[0];
const int NP = meta[1];
const float qscale = k_as_float(uint32_t(meta[2]));
const int cap = meta[3];
int ctx = context_lens[b];
ctx = (ctx < cap) ? ctx : cap;
const int t0 = part * NW * TPW * CPW;
const size_t head0 = size_t(b) * NH + size_t(kvh) * G;  // first query head of the group

if (t0 >= ctx) {  // past this sequence's context (uniform in the threadgroup)
#if ONE
  for (int i = int(tid); i < G * D; i += NT) out[head0 * D + i] = static_cast<T>(0.0f);
#else
  k_empty_partition(part_o, part_ml, head0, G, NP, part, D, NT, int(tid), NEG);
#endif
  return;
}

float qv[G][E];
KUNROLL for (int g = 0; g < G; ++g) {
  uint32_t w[W];
  k_load_words<W>((const KDEV uint32_t*)(queries + (head0 + g) * D + lane * E), w);
  k_words_to_floats<XK, W>(w, qv[g]);
  KUNROLL for (int e = 0; e < E; ++e) qv[g][e] *= qscale;
}

// the warp's online softmax: running max m, sum l and p @ V acc of lane l's columns
float m[G];
float l[G];
float acc[G][E];
KUNROLL for (int g = 0; g < G; ++g) {
  m[g] = NEG;
  l[g] = 0.0f;
  KUNROLL for (int e = 0; e < E; ++e) acc[g][e] = 0.0f;
}
const size_t rows0 = (size_t(b) * KVH + size_t(kvh)) * size_t(cap);
for (int c = 0; c < CPW; ++c) {
  const int tw = t0 + (c * NW + int(simd_id)) * TPW;
  if (tw >= ctx) break;  // uniform in the warp
  // rows past the context re-read the last row (a valid address) and get probability 0
  uint32_t kw[TPW][W];
  uint32_t vw[TPW][W];
  KUNROLL for (int i = 0; i < TPW; ++i) {
    const int t = (tw + i < ctx) ? tw + i : ctx - 1;
    k_load_words<W>((const KDEV uint32_t*)(keys + (rows0 + size_t(t)) * D + lane * E), kw[i]);
  }
  KUNROLL for (int i = 0; i < TPW; ++i) {
    const int t = (tw + i < ctx) ? tw + i : ctx - 1;
    k_load_words<W>((const KDEV uint32_t*)(values + (rows0 + size_t(t)) * D + lane * E), vw[i]);
  }
  float s[TPW][G];
  KUNROLL for (int i = 0; i < TPW; ++i) {
    float kf[E];
    k_words_to_floats<XK, W>(kw[i], kf);
    KUNROLL for (int g = 0; g < G; ++g) {
      float a = 0.0f;
      KUNROLL for (int e = 0; e < E; ++e) a = k_fma(qv[g][e], kf[e], a);
      s[i][g] = (tw + i < ctx) ? k_simd_sum(a) : NEG;
    }
  }
  KUNROLL for (int g = 0; g < G; ++g) {
    float mc = m[g];
    KUNROLL for (int i = 0; i < TPW; ++i) mc = (s[i][g] > mc) ? s[i][g] : mc;
    const float alpha = k_exp2(m[g] - mc);  // rescales what the earlier chunks summed
    m[g] = mc;
    l[g] *= alpha;
    KUNROLL for (int e = 0; e < E; ++e) acc[g][e] *= alpha;
  }
  KUNROLL for (int i = 0; i < TPW; ++i) {
    float vf[E];
    k_words_to_floats<XK, W>(vw[i], vf);
    KUNROLL for (int g = 0; g < G; ++g) {
      const float p = (tw + i < ctx) ? k_exp2(s[i][g] - m[g]) : 0.0f;
      l[g] += p;
      KUNROLL for (int e = 0; e < E; ++e) acc[g][e] = k_fma(p, vf[e], acc[g][e]);
    }
  }
}

// the warps meet: each rescales to the partition's max M (a warp without tokens has m = NEG,
// so weight 0), then the partial sums are added
KUNROLL for (int g = 0; g < G; ++g) {
  if (lane == 0) red_sh[simd_id * G + g] = m[g];
}
KBARRIER();
KUNROLL for (int g = 0; g < G; ++g) {
  float mm = NEG;
  KUNROLL for (int w = 0; w < NW; ++w) {
    const float x = red_sh[w * G + g];
    mm = (x > mm) ? x : mm;
  }
  const float f = k_exp2(m[g] - mm);
  KUNROLL for (int e = 0; e < E; ++e) acc_sh[(simd_id * G + g) * D + lane * E + e] = acc[g][e] * f;
  if (lane == 0) red_sh[(NW + simd_id) * G + g] = l[g] * f;
}
KBARRIER();
for (int idx = int(tid); idx < G * D; idx += NT) {
  const int g = idx / D;
  const int c = idx % D;
  float o = 0.0f;
  KUNROLL for (int w = 0; w < NW; ++w) o += acc_sh[(w * G + g) * D + c];
#if ONE
  float ll = 0.0f;
  KUNROLL for (int w = 0; w < NW; ++w) ll += red_sh[(NW + w) * G + g];
  out[(head0 + g) * D + c] = static_cast<T>(o / ll);
#else
  part_o[((head0 + g) * NP + part) * D + c] = o;
#endif
}
#if !ONE
if (tid < G) {  // (max, sum) of head tid, from threadgroup memory (no indexed registers)
  float mm = NEG;
  float ll = 0.0f;
  KUNROLL for (int w = 0; w < NW; ++w) {
    const float x = red_sh[w * G + tid];
    mm = (x > mm) ? x : mm;
    ll += red_sh[(NW + w) * G + tid];
  }
  const size_t o = ((head0 + tid) * NP + part) * 2;
  part_ml[o] = mm;
  part_ml[o + 1] = ll;
}
#endif
