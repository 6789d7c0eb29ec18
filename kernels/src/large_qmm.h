// large_qmm: y[m, n] = sum_k x[m, k] * (scales[n, g] * q[n, k] + biases[n, g]) for many rows of
// x (prefill, M in the hundreds and more), 4-bit affine weights in MLX's layout, dequantized in
// registers and multiplied on warpgroup tensor cores: no dense copy of the weights.
//
// Why: for M = 512 on the large shapes, dequantize + MLX's matmul first writes the whole weight
// matrix in 16 bits (470 MB at 8192 -> 28672, ~220 µs on an H200) before the GEMM reads it again.
//
// The product is transposed: the weights are the A operand (64 weight rows a warpgroup tile, A
// from registers) and the rows of x the B operand, read by the tensor cores from shared memory.
// Work: a threadgroup of WG warpgroups takes NX rows of x and 64 * MW * WG weight rows; warpgroup
// wg owns MW 64-row tiles for all NX x rows (MW x NX / 64 products of 64 x 64 per k16 slice).
// K goes in stages of 128: the stage's NX x 128 slice of x arrives in shared memory by
// asynchronous copies, ahead of use; lane 4 g + c of warp wq reads the 32 codes of chunk
// c (16 bytes) of its rows g and g + 8 of each tile, one stage ahead in registers, and decodes
// them as qmm.h does: pair words (j, j + 4) of a word through the exponent trick, one mask, one
// subtraction and one FMA per two weights. The k order inside a stage is the decode's (product
// P = 4 h + kk of half chunk h takes pairs 2 kk, 2 kk + 1 of every lane's chunk), so x arrives
// permuted to match (large_qmm.py `permute_x`: one copy of x, 8 MB at M = 512, K = 8192).
// While a product's tensor-core group runs, the lanes decode the next product's A fragments
// into the other register set; the next stage's weights load during the whole stage.
//
// Template constants: T (x and y), S (scales, biases), XK (1 float16, 2 bfloat16), GS (a
// multiple of 32), K (a multiple of 128), N, MW, NX (64 or 128), WG, ST (stages: x is loaded
// ST - 2 stages ahead; two stages load one ahead and drain the tensor cores every stage).
// rows[0] holds M (run time).
//// INCLUDE quant_common.h
// byte offset of 16-byte unit u (0..15) of row r in a stage's x tile: two 64-value halves of
// NX rows each, rows 128 bytes apart, units XOR-swizzled by row % 8 (the 128-byte swizzle)
#define LQ_UNIT(r, u) (((u) >> 3) * NX * 128 + (r) * 128 + ((((u) & 7) ^ ((r) & 7)) << 4))

// d (a warpgroup's 64 x 64 accumulators) += A (this warp's 16 rows of the 64 x 16 weight slice,
// k_mma16816's A fragment) * B (the slice of the 64 x rows of the tile at b, at byte koff of
// their 128-byte rows): one wgmma where the GPU has it, else 8 per-warp m16n8k16 products.
template <int XK>
KINLINE void lq_mma64(KTHREAD float* d, KTHREAD const uint32_t* a, KTG const uint8_t* b, int koff,
                      uint32_t lane) {
#if K_HAS_WGMMA
  (void)lane;
  k_wg_mma64<XK>(d, a, b, koff);
#else
  const int g = int(lane) >> 2, c = int(lane) & 3;
  KUNROLL for (int j = 0; j < 8; ++j) {
    const int r = 8 * j + g;
    uint32_t bf[2];
    KUNROLL for (int h = 0; h < 2; ++h) {
      const int o = koff + 16 * h + 4 * c;  // slots 2c, 2c + 1 (+ 8) of the slice, unswizzled
      bf[h] = *(KTG const uint32_t*)(b + r * 128 + (((o >> 4) ^ (r & 7)) << 4) + (o & 15));
    }
    k_mma16816<XK>(d + 4 * j, a, bf, lane);
  }
#endif
}
//// BODY
constexpr int BITS = 4;
constexpr int KW = K * BITS / 32;      // words per weight row
constexpr int NG = K / GS;             // groups per row
constexpr int STEPS = K / 128;         // stages
constexpr int NB = NX / 64;            // 64-column products per tile and k16 slice
constexpr int NTH = 128 * WG;          // threads
constexpr int XBYTES = NX * 256;       // one stage's x tile
#define LQ_AHEAD (ST > 2 ? ST - 2 : 1)  // stages of x in flight
constexpr uint32_t MAGIC_BITS = (XK == 1) ? 0x64006400u : 0x43004300u;

K_SHARED_1K(xs, ST * XBYTES)

const int M = rows[0];
const int wq = int(simd_id) & 3;       // warp in its warpgroup: rows 16 wq .. 16 wq + 15 of a tile
const int g = int(lane) >> 2;
const int c = int(lane) & 3;
const int m0 = int(tg_x) * NX;
const int n0 = int(tg_y) * 64 * MW * WG + (int(simd_id) >> 2) * 64 * MW;

// stage s_ of x into buffer b_ (rows past M read as zeros)
#define LQ_LOADX(s_, b_)                                                                   \
  KUNROLL for (int i_ = int(tid); i_ < NX * 16; i_ += NTH) {                               \
    const int r_ = i_ >> 4, u_ = i_ & 15;                                                  \
    const bool ok_ = m0 + r_ < M;                                                          \
    k_cp16(xs + (b_) * XBYTES + LQ_UNIT(r_, u_),                                           \
           x + size_t(ok_ ? m0 + r_ : 0) * K + (s_) * 128 + 8 * u_, ok_);                   \
  }
// this lane's chunk of stage s_ for its rows (past N: clamped to N - 1, never stored)
#define LQ_LOADW(s_)                                                                       \
  KUNROLL for (int t_ = 0; t_ < MW; ++t_) {                                                \
    KUNROLL for (int hh_ = 0; hh_ < 2; ++hh_) {                                            \
      const int n_ = n0 + 64 * t_ + 16 * wq + 8 * hh_ + g;                                 \
      const size_t row_ = size_t(n_ < N ? n_ : N - 1);                                     \
      const uint4 v_ = *(const KDEV uint4*)(w + row_ * KW + (4 * (s_) + c) * BITS);        \
      nwv[t_][hh_][0] = v_.x; nwv[t_][hh_][1] = v_.y;                                      \
      nwv[t_][hh_][2] = v_.z; nwv[t_][hh_][3] = v_.w;                                      \
      const size_t gx_ = row_ * NG + (128 * (s_) + 32 * c) / GS;                           \
      nsc[t_][hh_] = float(scales[gx_]);                                                   \
      nbc[t_][hh_] = float(biases[gx_]);                                                   \
    }                                                                                      \
  }

float acc[MW][NB][32];
KUNROLL for (int t = 0; t < MW; ++t) {
  KUNROLL for (int nb = 0; nb < NB; ++nb) {
    KUNROLL for (int i = 0; i < 32; ++i) acc[t][nb][i] = 0.0f;
  }
}
uint32_t nwv[MW][2][4];
float nsc[MW][2], nbc[MW][2];
KUNROLL for (int s = 0; s < LQ_AHEAD; ++s) {
  if (s < STEPS) LQ_LOADX(s, s)
  k_cp_commit();
}
LQ_LOADW(0)
// The A fragments' two register sets alternate across products and stages: product P's set is
// written again only after the wait that follows product P + 1's issue.
uint32_t af[2][MW][4];
KUNROLL for (int t = 0; t < MW; ++t) {
  KUNROLL for (int i = 0; i < 4; ++i) af[0][t][i] = af[1][t][i] = 0u;
}

for (int s = 0; s < STEPS; ++s) {
  k_cp_wait<LQ_AHEAD - 1>();
  KBARRIER();  // stage s is in for every thread
  // Stage s + LQ_AHEAD goes into the buffer of stage s - 2 (ST >= 3), whose products are done:
  // every warpgroup passed the barrier after waiting for all but its last product of stage
  // s - 1. With two stages it is stage s - 1's buffer, drained at the end of that stage.
  if (s + LQ_AHEAD < STEPS) LQ_LOADX(s + LQ_AHEAD, (s + LQ_AHEAD) % ST)
  k_cp_commit();
  uint32_t wv[MW][2][4], s2[MW][2], b2[MW][2];
  KUNROLL for (int t = 0; t < MW; ++t) {
    KUNROLL for (int hh = 0; hh < 2; ++hh) {
      KUNROLL for (int i = 0; i < 4; ++i) wv[t][hh][i] = nwv[t][hh][i];
      s2[t][hh] = k_pack16x2<XK>(nsc[t][hh], nsc[t][hh]);
      b2[t][hh] = k_pack16x2<XK>(nbc[t][hh], nbc[t][hh]);
    }
  }
  if (s + 1 < STEPS) LQ_LOADW(s + 1)
  KTG const uint8_t* tile = xs + (s % ST) * XBYTES;
  KUNROLL for (int P = 0; P < 8; ++P) {
    const int h = P >> 2, kk = P & 3;
    KUNROLL for (int t = 0; t < MW; ++t) {
      KUNROLL for (int i = 0; i < 2; ++i) {
        const int p = 2 * kk + i;  // pair p of half chunk h: codes p % 4, p % 4 + 4 of word 2 h + p / 4
        KUNROLL for (int hh = 0; hh < 2; ++hh) {
          const uint32_t m = k_and_or(wv[t][hh][2 * h + p / 4] >> (4 * (p % 4)), 0x000F000Fu, MAGIC_BITS);
          af[P & 1][t][hh + 2 * i] = k_dq_pair<XK>(m, s2[t][hh], b2[t][hh]);
        }
      }
    }
    k_wg_fence();
    KUNROLL for (int t = 0; t < MW; ++t) {
      KUNROLL for (int nb = 0; nb < NB; ++nb)
        lq_mma64<XK>(acc[t][nb], af[P & 1][t], tile + h * NX * 128 + nb * 64 * 128, 32 * kk, lane);
    }
    k_wg_commit();
    k_wg_wait<1>();  // product P - 1 is done: its register set is free for product P + 1
    k_wg_keep_u<4 * MW>(&af[(P + 1) & 1][0][0]);  // (and the compiler may not reuse it before)
  }
  if (ST == 2) k_wg_wait<0>();
}
k_wg_wait<0>();
k_wg_keep_u<8 * MW>(&af[0][0][0]);
KUNROLL for (int t = 0; t < MW; ++t) {
  KUNROLL for (int nb = 0; nb < NB; ++nb) k_wg_keep<32>(acc[t][nb]);
}

// accumulator i of n8 tile j: weight row 16 wq + g (+ 8 for i >= 2), x row 8 j + 2 c (+ 1 odd i)
KUNROLL for (int t = 0; t < MW; ++t) {
  KUNROLL for (int nb = 0; nb < NB; ++nb) {
    KUNROLL for (int j = 0; j < 8; ++j) {
      KUNROLL for (int i = 0; i < 4; ++i) {
        const int n = n0 + 64 * t + 16 * wq + g + 8 * (i >> 1);
        const int m = m0 + 64 * nb + 8 * j + 2 * c + (i & 1);
        if (n < N && m < M) y[size_t(m) * N + n] = static_cast<T>(acc[t][nb][4 * j + i]);
      }
    }
  }
}
