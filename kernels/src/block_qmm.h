// block_qmm: y[64 b + r, n] = sum_k x[64 b + r, k] * W_e[n, k] with e = owner[b]: rows grouped
// in 64-row blocks of one expert each (the MoE prefill's expert blocks, kernels/block_qmm.py),
// the experts stacked (E, N, K) in MLX's affine layout and dequantized in registers, with no
// dense copy of any weight. With BQ_GATED 1 (block_qmm_glu.h) the block has a second stack
// (w2, the up projection) and y = silu(x W^T) * (x W2^T).
//
// Work: a threadgroup takes one block and TN = 8 * NT * NW columns of each stack; simdgroup s
// owns columns 8 NT s ... of them for all 64 rows (4 x NT m16n8k16 tiles per stack). K goes in
// steps of 128: the threadgroup stages the block's 64 x 128 activations in threadgroup memory
// (two buffers; the next step's loads are in flight while this one computes), and lane 4 g + c
// of every simdgroup reads the 32 codes of chunk c of its weight rows g (one 16-byte load per
// row at 4 bits) and decodes them into B fragments as qmm.h does: in the fragment's k slots,
// the order cheapest to decode. The activations are staged in that same order (each word the
// pair of values that meets a decoded weight pair), so a lane's A fragments are plain 16-byte
// reads; the 16-byte units of a row are XOR-swizzled so that the eight lanes of a read phase
// (rows g, g + 1, chunks 0-3) hit distinct banks.
//
// Blocks from meta[0] on are spare (the caller's static bound on the block count) and return
// at once; their rows of y are left unwritten and must not be read.
//
// Template constants: T (x and y, 16-bit), S (scales, biases), XK (1 float16, 2 bfloat16),
// BITS, GS (a multiple of 32), K (a multiple of 32), N, NT, NW.
//// INCLUDE quant_common.h
#ifndef BQ_GATED
#define BQ_GATED 0
#endif
// Pair p (0..7) of a 16-value half chunk: the offsets of its low and high value (MAGIC decode
// pairs codes j and j + PW of a word; the float decode takes neighbours).
#define BQ_LO(p) (MAGIC ? 2 * PW * ((p) / PW) + (p) % PW : 2 * (p))
#define BQ_HI(p) (BQ_LO(p) + (MAGIC ? PW : 1))
#define BQ_HALF(X, o) (((X)[(o) >> 1] >> (16 * ((o) & 1))) & 0xFFFFu)
// the staged unit (16 bytes) u of row r, chunk c: XOR-swizzled across the banks
#define BQ_UNIT(r, c, u) ((r) * 16 + ((u) ^ ((((c) >> 1) & 1) | (((r) & 1) << 1))))
//// BODY
constexpr int G = BQ_GATED ? 2 : 1;    // weight stacks
constexpr int BM = 64;                 // rows per block
constexpr int MTILES = BM / 16;
constexpr int KW = K * BITS / 32;      // words per weight row
constexpr int NG = K / GS;             // groups per row
constexpr int CH = K / 32;             // 32-value chunks per row
constexpr int STEPS = (CH + 3) / 4;    // 128-value steps
constexpr bool FAST = (BITS == 2 || BITS == 4 || BITS == 8);
constexpr uint32_t MASK = (1u << BITS) - 1u;
constexpr float CENTER = float(1 << (BITS - 1));
constexpr bool MAGIC = (BITS == 2 || BITS == 4 || (BITS == 8 && XK == 1));
constexpr int PW = 16 / BITS;
constexpr uint32_t MAGIC_BITS = (XK == 1) ? 0x64006400u : 0x43004300u;
constexpr int TN = 8 * NT * NW;
constexpr int TASKS = BM * 8 / (32 * NW);  // half chunks (16 values) each thread stages a step

KSHARED uint4 xs[2][BM * 16];

const int blk = int(tg_y);
if (blk >= meta[0]) return;  // a spare block: the whole threadgroup leaves together
const int e = int(owner[blk]);
const int g = int(lane) >> 2;
const int c = int(lane) & 3;
const int n0 = int(tg_x) * TN + int(simd_id) * 8 * NT;
const KDEV T* xb = x + size_t(blk) * BM * K;

// this step's half chunks of the block, as pair words in registers (then to a buffer)
uint32_t xp[TASKS][8];
#define BQ_LOADX(s_)                                                                       \
  KUNROLL for (int j_ = 0; j_ < TASKS; ++j_) {                                             \
    const int i_ = int(tid) + j_ * 32 * NW;                                                \
    const int ch_ = 4 * (s_) + ((i_ & 7) >> 1);                                            \
    uint32_t X_[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};                                     \
    if (ch_ < CH) {                                                                        \
      const KDEV uint4* p_ = (const KDEV uint4*)(xb + size_t(i_ >> 3) * K + ch_ * 32 + 16 * (i_ & 1)); \
      const uint4 a_ = p_[0];                                                              \
      const uint4 b_ = p_[1];                                                              \
      X_[0] = a_.x; X_[1] = a_.y; X_[2] = a_.z; X_[3] = a_.w;                              \
      X_[4] = b_.x; X_[5] = b_.y; X_[6] = b_.z; X_[7] = b_.w;                              \
    }                                                                                      \
    KUNROLL for (int p_ = 0; p_ < 8; ++p_)                                                 \
      xp[j_][p_] = MAGIC ? BQ_HALF(X_, BQ_LO(p_)) | (BQ_HALF(X_, BQ_HI(p_)) << 16) : X_[p_]; \
  }
#define BQ_STOREX(buf_)                                                                    \
  KUNROLL for (int j_ = 0; j_ < TASKS; ++j_) {                                             \
    const int i_ = int(tid) + j_ * 32 * NW;                                                \
    const int r_ = i_ >> 3, c_ = (i_ & 7) >> 1, u_ = 4 * c_ + 2 * (i_ & 1);                \
    xs[buf_][BQ_UNIT(r_, c_, u_)] = k_uint4(xp[j_][0], xp[j_][1], xp[j_][2], xp[j_][3]);   \
    xs[buf_][BQ_UNIT(r_, c_, u_ + 1)] = k_uint4(xp[j_][4], xp[j_][5], xp[j_][6], xp[j_][7]); \
  }

// codes, scale and bias of this lane's chunk of step s_ for its NT rows of each stack (rows
// past N clamp to N - 1; chunks past K read the last one with zero scale and bias)
#if BQ_GATED
#define BQ_STACK(gi_, name) ((gi_) == 0 ? name : name##2)
#else
#define BQ_STACK(gi_, name) name
#endif
#define BQ_LOADW(s_, WV, SC, BC)                                                           \
  {                                                                                        \
    const int ch_ = 4 * (s_) + c;                                                          \
    const int chc_ = (ch_ < CH) ? ch_ : (CH - 1);                                          \
    KUNROLL for (int gi_ = 0; gi_ < G; ++gi_) {                                            \
      KUNROLL for (int t = 0; t < NT; ++t) {                                               \
        const int row_ = (n0 + 8 * t + g < N) ? (n0 + 8 * t + g) : (N - 1);                \
        const size_t er_ = size_t(e) * N + row_;                                           \
        const KDEV uint32_t* wp_ = BQ_STACK(gi_, w) + er_ * KW + size_t(chc_) * BITS;      \
        K_LOAD_CODES(WV[gi_][t], wp_)                                                      \
        const size_t gx_ = er_ * NG + (chc_ * 32) / GS;                                    \
        SC[gi_][t] = (ch_ < CH) ? float(BQ_STACK(gi_, scales)[gx_]) : 0.0f;                \
        BC[gi_][t] = (ch_ < CH) ? float(BQ_STACK(gi_, biases)[gx_]) : 0.0f;                \
      }                                                                                    \
    }                                                                                      \
  }

float acc[G][MTILES][NT][4];
KUNROLL for (int gi = 0; gi < G; ++gi) {
  KUNROLL for (int mt = 0; mt < MTILES; ++mt) {
    KUNROLL for (int t = 0; t < NT; ++t) {
      KUNROLL for (int i = 0; i < 4; ++i) acc[gi][mt][t][i] = 0.0f;
    }
  }
}

uint32_t nwv[G][NT][BITS];
float nsc[G][NT], nbc[G][NT];
BQ_LOADX(0)
BQ_STOREX(0)
BQ_LOADW(0, nwv, nsc, nbc)
KBARRIER();

for (int s = 0; s < STEPS; ++s) {
  uint32_t wv[G][NT][BITS];
  uint32_t s2[G][NT], b2[G][NT];  // MAGIC: scale and bias as 16-bit pairs
  float sc[G][NT], bc[G][NT];     // otherwise: scale, and bias + CENTER * scale
  KUNROLL for (int gi = 0; gi < G; ++gi) {
    KUNROLL for (int t = 0; t < NT; ++t) {
      KUNROLL for (int i = 0; i < BITS; ++i) wv[gi][t][i] = nwv[gi][t][i];
      sc[gi][t] = nsc[gi][t];
      bc[gi][t] = MAGIC ? nbc[gi][t] : nbc[gi][t] + CENTER * nsc[gi][t];
      s2[gi][t] = k_pack16x2<XK>(sc[gi][t], sc[gi][t]);
      b2[gi][t] = k_pack16x2<XK>(bc[gi][t], bc[gi][t]);
    }
  }
  if (s + 1 < STEPS) {  // the next step's loads in flight during this one's products
    BQ_LOADX(s + 1)
    BQ_LOADW(s + 1, nwv, nsc, nbc)
  }
  const int buf = s & 1;
  KUNROLL for (int h = 0; h < 2; ++h) {
    KUNROLL for (int q = 0; q < 2; ++q) {
      // pair words 4q .. 4q + 3 of half h of rows g and g + 8 of every 16-row tile
      uint4 xa[MTILES][2];
      KUNROLL for (int mt = 0; mt < MTILES; ++mt) {
        KUNROLL for (int hh = 0; hh < 2; ++hh) {
          const int r = 16 * mt + 8 * hh + g;
          xa[mt][hh] = xs[buf][BQ_UNIT(r, c, 4 * c + 2 * h + q)];
        }
      }
      KUNROLL for (int k2 = 0; k2 < 2; ++k2) {
        const int kk = 2 * q + k2;  // the k16 product of this half chunk
        uint32_t bf[G][NT][2];
        KUNROLL for (int gi = 0; gi < G; ++gi) {
          KUNROLL for (int t = 0; t < NT; ++t) {
            KUNROLL for (int i = 0; i < 2; ++i) {
              const int p = 2 * kk + i;
              if (MAGIC) {
                const int wi = h * (BITS / 2) + p / PW;
                const uint32_t word = wv[gi][t][(wi < BITS) ? wi : BITS - 1];
                const uint32_t m = ((word >> (BITS * (p % PW))) & (MASK | (MASK << 16))) | MAGIC_BITS;
                bf[gi][t][i] = k_dq_pair<XK>(m, s2[gi][t], b2[gi][t]);
              } else {
                float q0, q1;
                K_AFFINE_CODE(q0, wv[gi][t], 16 * h + 2 * p)
                K_AFFINE_CODE(q1, wv[gi][t], 16 * h + 2 * p + 1)
                bf[gi][t][i] = k_pack16x2<XK>(k_fma(sc[gi][t], q0, bc[gi][t]),
                                              k_fma(sc[gi][t], q1, bc[gi][t]));
              }
            }
          }
        }
        KUNROLL for (int mt = 0; mt < MTILES; ++mt) {
          const uint32_t lo[4] = {xa[mt][0].x, xa[mt][0].y, xa[mt][0].z, xa[mt][0].w};
          const uint32_t hi[4] = {xa[mt][1].x, xa[mt][1].y, xa[mt][1].z, xa[mt][1].w};
          const uint32_t af[4] = {lo[2 * k2], hi[2 * k2], lo[2 * k2 + 1], hi[2 * k2 + 1]};
          KUNROLL for (int gi = 0; gi < G; ++gi) {
            KUNROLL for (int t = 0; t < NT; ++t) k_mma16816<XK>(acc[gi][mt][t], af, bf[gi][t], lane);
          }
        }
      }
    }
  }
  if (s + 1 < STEPS) BQ_STOREX(buf ^ 1)
  KBARRIER();
}

// rows 16 mt + g (+ 8) of the block, columns 8 t + 2 c (+ 1) of this simdgroup's
KUNROLL for (int mt = 0; mt < MTILES; ++mt) {
  KUNROLL for (int t = 0; t < NT; ++t) {
    const int col = n0 + 8 * t + 2 * c;
    KUNROLL for (int i = 0; i < 4; ++i) {
      const int row = blk * BM + 16 * mt + g + 8 * (i >> 1);
      float v = acc[0][mt][t][i];
#if BQ_GATED
      v = k_silu(v) * acc[G - 1][mt][t][i];
#endif
      if (col + (i & 1) < N) y[size_t(row) * N + col + (i & 1)] = static_cast<T>(v);
    }
  }
}
