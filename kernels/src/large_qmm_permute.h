// large_qmm_permute: x (M, K) with each block of 128 values in large_qmm.h's k order: slot
// 16 P + 8 t + 2 c + e of a block (product P = 4 h + 2 a + b) takes value 32 c + 16 h + 8 a +
// 4 e + 2 b + t (large_qmm.py `permute_x`, the same map with MLX's ops). One thread a block: 16
// loads of 16 bytes, 64 pair words, 16 stores. Template constants: T (16-bit), K (a multiple
// of 128). Threads past the M * K / 128 blocks (the grid's last threadgroup) return.
//// BODY
constexpr int NBLK = K / 128;
if (gid >= uint32_t(rows[0]) * NBLK) return;
const KDEV uint4* src = (const KDEV uint4*)(x + size_t(gid) * 128);
KDEV uint4* dst = (KDEV uint4*)(xp + size_t(gid) * 128);
uint32_t X[64];  // word i: values 2 i, 2 i + 1
KUNROLL for (int i = 0; i < 16; ++i) {
  const uint4 v = src[i];
  X[4 * i] = v.x; X[4 * i + 1] = v.y; X[4 * i + 2] = v.z; X[4 * i + 3] = v.w;
}
KUNROLL for (int u = 0; u < 16; ++u) {  // output unit u: product u / 2, slots 8 (u % 2) ..
  uint32_t o[4];
  const int P = u >> 1, t = u & 1, h = P >> 2, a = (P >> 1) & 1, b = P & 1;
  KUNROLL for (int c = 0; c < 4; ++c) {
    const int k0 = 32 * c + 16 * h + 8 * a + 2 * b + t;  // e = 0; e = 1 is k0 + 4
    const uint32_t lo = X[k0 >> 1], hi = X[(k0 >> 1) + 2];
    o[c] = (k0 & 1) ? ((lo >> 16) | (hi & 0xFFFF0000u)) : ((lo & 0xFFFFu) | (hi << 16));
  }
  dst[u] = k_uint4(o[0], o[1], o[2], o[3]);
}
