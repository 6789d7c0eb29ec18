// gather_rows: out[r, :] = x[idx[r], :] for idx[r] < meta[0] (the rows of x), zeros otherwise,
// 16 bytes per thread: a simdgroup copies 512 contiguous bytes of a row per instruction.
// Template constant: W4 (16-byte pieces per row); meta[1] is the number of rows of out (run
// time, so prompts of any length share one compiled kernel).
//// BODY
if (int(gid) >= meta[1] * W4) return;
const int r = int(gid) / W4;
const int p = int(gid) % W4;
const uint32_t src = idx[r];
uint4 val = k_uint4(0u, 0u, 0u, 0u);
if (src < uint32_t(meta[0])) val = ((const KDEV uint4*)x)[size_t(src) * W4 + p];
((KDEV uint4*)out)[size_t(r) * W4 + p] = val;
