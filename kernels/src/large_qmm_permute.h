// large_qmm_permute: x (M, K) with each block of 128 values in large_qmm.h's k order: slot
// 16 P + 8 t + 2 c + e of a block (product P = 4 h + 2 a + b) takes value 32 c + 16 h + 8 a +
// 4 e + 2 b + t (large_qmm.py `permute_x`, the same map with MLX's ops). One thread per 16
// output bytes (slots 8 u .. 8 u + 7 of a block): 8 four-byte reads of pair words, which the
// block's other 15 threads read too (one cache line pair). Template constants: T (16-bit), K
// (a multiple of 128). Threads past the M * K / 8 units (the last threadgroup's) return.
//// BODY
if (gid >= uint32_t(rows[0]) * (K / 8)) return;
const int u = int(gid & 15u);
const KDEV uint32_t* src = (const KDEV uint32_t*)(x + size_t(gid >> 4) * 128);  // word i: values 2 i, 2 i + 1
const int P = u >> 1, t = u & 1, h = P >> 2, a = (P >> 1) & 1, b = P & 1;
uint32_t o[4];
KUNROLL for (int c = 0; c < 4; ++c) {
  const int k0 = 32 * c + 16 * h + 8 * a + 2 * b + t;  // e = 0; e = 1 is k0 + 4
  const uint32_t lo = src[k0 >> 1], hi = src[(k0 >> 1) + 2];
  o[c] = t ? ((lo >> 16) | (hi & 0xFFFF0000u)) : ((lo & 0xFFFFu) | (hi << 16));
}
((KDEV uint4*)xp)[gid] = k_uint4(o[0], o[1], o[2], o[3]);
