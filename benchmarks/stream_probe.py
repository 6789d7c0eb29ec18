"""What a read-only stream of N bytes costs on this GPU, beside our GEMV on the same bytes.

The ceiling a memory-bound GEMV can reach depends on the size: a 9-28 MB weight matrix is
read in 2-7 µs at the HBM's rate, so launch ramp-up and the tail weigh on it. This probe
times a plain read kernel (CUDA only: a measurement tool, not a project kernel) over the
byte counts of Qwen3-8B's decode GEMVs (4-bit g64 codes + scales + biases), with 1-8 16-byte
loads in flight per thread and 1-16 resident blocks per SM, and our qmv / MLX's
quantized_matmul / the fp16 GEMV on the matching shapes, all in one process under Nsight
Compute:

    ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
        python3 benchmarks/stream_probe.py > stream.csv
    python3 benchmarks/ncu_probe.py --parse stream.csv
"""
from __future__ import annotations

import os
import sys

import mlx.core as mx

SMS = 132
# (K, N) of Qwen3-8B's decode GEMVs and the shapes
SHAPES = [(4096, 4096), (4096, 6144), (12288, 4096), (4096, 12288), (4096, 24576),
          (28672, 8192)]

_SRC = """
const uint4* p = reinterpret_cast<const uint4*>(a);
const size_t tid = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
const size_t nth = size_t(gridDim.x) * blockDim.x;
uint32_t acc = 0;
for (size_t base = tid; base < NV; base += nth * V) {
  uint4 v[V];
  _Pragma("unroll") for (int j = 0; j < V; ++j) {
    const size_t i = base + size_t(j) * nth;
    v[j] = (i < NV) ? p[i] : make_uint4(0, 0, 0, 0);
  }
  _Pragma("unroll") for (int j = 0; j < V; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
}
if (acc == 0x9e3779b9u) out[0] = acc;
"""


# The same bytes read in a GEMV's order, with no arithmetic: a simdgroup reads R rows of KB
# bytes in 16-byte loads, the SK simdgroups of a threadgroup splitting each row in steps of
# 32 * 16 * LQ bytes (LQ = 1: a lane reads 16 consecutive bytes, 32 lanes 512 contiguous bytes
# of one row, as qmv's float body; LQ = 4 lanes per row, 8 rows per load, as qmv_tc: LANES = 4).
_ROWS_SRC = """
const uint4* p = reinterpret_cast<const uint4*>(a);
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int row0 = blockIdx.x * R;
constexpr int V16 = KB / 16;               // 16-byte pieces per row
constexpr int RPL = 32 / LANES;            // rows one load instruction covers
uint32_t acc = 0;
for (int v = warp * LANES + (lane % LANES); v < V16; v += SK * LANES) {
  uint4 t[R / RPL];
  _Pragma("unroll") for (int r = 0; r < R / RPL; ++r) {
    const int row = row0 + r * RPL + lane / LANES;
    t[r] = p[size_t(row) * V16 + v];
  }
  _Pragma("unroll") for (int r = 0; r < R / RPL; ++r) acc ^= t[r].x ^ t[r].y ^ t[r].z ^ t[r].w;
}
if (acc == 0x9e3779b9u) out[0] = acc;
"""


# The same bytes in the folded GEMV's order (src/fold_core.h, one row of x): a simdgroup owns
# 16 RT rows, lane 4 g + c reads rows g and g + 8 of each tile, a step is 32 words of a row
# read as 32 / (4 LW) loads of LW words per lane (LW 2: the g64 fold's 8-byte pieces, 32 bytes
# of a row per load and lane quad; LW 4: 16-byte pieces, 64 bytes), SK simdgroups splitting K.
_FOLD_ORDER_SRC = """
const unsigned int* p = a;
const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
const int g = lane >> 2, c = lane & 3;
const int n0 = blockIdx.x * 16 * RT;
constexpr int KW = KB / 4, STEPS = KW / 32, NL = 32 / (4 * LW);
uint32_t acc = 0;
for (int s = warp; s < STEPS; s += SK) {
  uint4 t[RT][2][NL];
  _Pragma("unroll") for (int tt = 0; tt < RT; ++tt) {
    _Pragma("unroll") for (int r = 0; r < 2; ++r) {
      const unsigned int* q = p + size_t(n0 + 16 * tt + 8 * r + g) * KW + s * 32 + c * LW;
      _Pragma("unroll") for (int l = 0; l < NL; ++l) {
        if (LW == 4) t[tt][r][l] = *(const uint4*)(q + l * 4 * LW);
        else if (LW == 2) { const uint2 v = *(const uint2*)(q + l * 4 * LW); t[tt][r][l] = make_uint4(v.x, v.y, 0, 0); }
        else t[tt][r][l] = make_uint4(q[l * 4 * LW], 0, 0, 0);
      }
    }
  }
  _Pragma("unroll") for (int tt = 0; tt < RT; ++tt)
    _Pragma("unroll") for (int r = 0; r < 2; ++r)
      _Pragma("unroll") for (int l = 0; l < NL; ++l)
        acc ^= t[tt][r][l].x ^ t[tt][r][l].y ^ t[tt][r][l].z ^ t[tt][r][l].w;
}
if (acc == 0x9e3779b9u) out[0] = acc;
"""


def fold_order_kernel():
    return mx.fast.cuda_kernel(name="stream_fold_order", input_names=["a"],
                               output_names=["out"], source=_FOLD_ORDER_SRC)


def fold_order(kern, a, N, KB, RT, SK, LW):
    return kern(inputs=[a], template=[("RT", RT), ("SK", SK), ("KB", KB), ("LW", LW)],
                grid=(32 * SK * (N // (16 * RT)), 1, 1), threadgroup=(32 * SK, 1, 1),
                output_shapes=[(1,)], output_dtypes=[mx.uint32])[0]

def rows_kernel():
    return mx.fast.cuda_kernel(name="stream_rows", input_names=["a"], output_names=["out"],
                               source=_ROWS_SRC)


def rows(kern, a, N, KB, R, SK, lanes):
    return kern(inputs=[a], template=[("R", R), ("SK", SK), ("KB", KB), ("LANES", lanes)],
                grid=(32 * SK * (N // R), 1, 1), threadgroup=(32 * SK, 1, 1),
                output_shapes=[(1,)], output_dtypes=[mx.uint32])[0]


def patterns():
    """Only the weight codes (K * N / 2 bytes) of 4096 -> 12288 and 28672 -> 8192, read as
    the plain stream, as qmv's float body (R 4, one row per load, SK 2-3), as qmv_tc
    (16-32 rows, 8 rows per load, SK 4-8) and in the folded GEMV's order with 4-, 8- and
    16-byte pieces per lane (RT 1-2, SK 2-8)."""
    kern, rk, fk = stream_kernel(), rows_kernel(), fold_order_kernel()
    for K, N in ((4096, 12288), (28672, 8192)):
        KB = K // 2
        a = mx.zeros((N * KB // 4,), mx.uint32)
        mx.eval(a)
        for rep in range(2):
            mx.eval(stream(kern, a, 4, -(-a.size // 4 // 1024)))
            for R, SK, lanes in ((4, 2, 32), (4, 3, 32), (8, 1, 32), (16, 4, 4), (16, 8, 4),
                                 (32, 4, 4), (32, 8, 4), (16, 4, 32), (32, 8, 32)):
                mx.eval(rows(rk, a, N, KB, R, SK, lanes))
            for RT, SK in ((1, 2), (1, 4), (1, 8), (2, 4)):
                for LW in (1, 2, 4):
                    mx.eval(fold_order(fk, a, N, KB, RT, SK, LW))
        del a


def stream_kernel():
    return mx.fast.cuda_kernel(name="stream_read", input_names=["a"], output_names=["out"],
                               source=_SRC)


def stream(kern, a, V, blocks, threads=256):
    nv = a.size // 4
    return kern(inputs=[a], template=[("V", V), ("NV", nv)], grid=(blocks * threads, 1, 1),
                threadgroup=(threads, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.uint32])[0]


def run():
    from marlin_mlx.kernels.qmv import qmv_kernel
    kern = stream_kernel()
    dt = mx.bfloat16
    for K, N in SHAPES:
        q, s, b = mx.quantize(mx.random.normal((N, K)).astype(dt) * 0.02, group_size=64, bits=4)
        x = mx.random.normal((1, K)).astype(dt)
        nbytes = q.nbytes + s.nbytes + b.nbytes
        a = mx.zeros((nbytes // 4,), mx.uint32)
        w16 = mx.random.normal((N, K)).astype(dt) if K * N <= 4096 * 24576 else None
        mx.eval(q, s, b, x, a)
        if w16 is not None:
            mx.eval(w16)
        print(f"shape {K}x{N}: {nbytes / 1e6:.1f} MB", file=sys.stderr)
        for rep in range(2):
            mx.eval(qmv_kernel(x, q, s, b, 64, 4))
            mx.eval(mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=4))
            if w16 is not None:
                mx.eval(x @ w16.T)
            for V in (1, 2, 4, 8):
                for bps in (1, 2, 4, 8, 16):
                    if bps * V <= 32:
                        mx.eval(stream(kern, a, V, bps * SMS))
                # one pass: every thread V loads, no loop
                mx.eval(stream(kern, a, V, -(-a.size // 4 // (256 * V))))
        del q, s, b, a, w16


def body_sweep(each, grid, rows=(1, 4, 8), dt=mx.bfloat16, ceiling=False):
    """qmv's bodies on Qwen3-8B's / the issue's shapes at `rows` rows of x (bfloat16 unless
    `dt`): the launches `each` (qmv_kernel keyword sets; None: MLX's quantized_matmul) at
    every row count, and at one row every keyword set of `grid`; with `ceiling`, the plain
    read of the same bytes (2 and 4 loads in flight, one pass) in the same process."""
    from marlin_mlx.kernels.qmv import qmv_kernel
    kern = stream_kernel() if ceiling else None
    for K, N in ((4096, 4096), (12288, 4096), (4096, 12288), (28672, 8192)):
        q, s, b = mx.quantize(mx.random.normal((N, K)).astype(dt) * 0.02, group_size=64, bits=4)
        mx.eval(q, s, b)
        if ceiling:
            a = mx.zeros(((q.nbytes + s.nbytes + b.nbytes) // 4,), mx.uint32)
            mx.eval(a)
            for rep in range(2):
                for V in (2, 4):
                    mx.eval(stream(kern, a, V, -(-a.size // 4 // (256 * V))))
            del a
        for M in rows:
            x = mx.random.normal((M, K)).astype(dt)
            mx.eval(x)
            for rep in range(2):
                for kw in each + (grid if M == 1 else []):
                    mx.eval(qmv_kernel(x, q, s, b, 64, 4, **kw) if kw is not None else
                            mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64,
                                                bits=4))
        del q, s, b


def tc_sweep():
    """The float body, the tensor-core body (automatic shape and every (RT, SK, U)), MLX."""
    body_sweep([dict(tc=False), dict(tc=True), None],
               [dict(tc=True, RT=RT, SK=SK, U=U) for RT in (1, 2) for SK in (4, 8)
                for U in (1, 2, 4)])


def pipe_sweep():
    """qmv_tc's asynchronous-copy loop over (PIPE, SK, U) beside the float body and the
    register-prefetch loop (PIPE 0)."""
    body_sweep([dict(tc=False), dict(tc=True, PIPE=0), dict(tc=True, PIPE=4)],
               [dict(tc=True, SK=SK, U=U, PIPE=P) for P in (2, 3, 4) for SK in (1, 2, 4)
                for U in (1, 2)])


def fold_sweep():
    """The folded tensor-core body (automatic shape and every (RT, SK, PF)) beside the float
    body, qmv_tc's register loop, MLX and the plain read of the same bytes, one row of
    bfloat16 x; then the automatic shapes with float16 x. FOLD_QUICK=1: the float body and
    the folded body's prefetch depths only (bfloat16)."""
    if os.environ.get("FOLD_QUICK") == "1":
        shapes = ((1, (2, 4, 8)), (2, (2, 4)))  # (RT, split-K values)
        body_sweep([dict(tc=False), dict(fold=True)],
                   [dict(fold=True, RT=RT, SK=SK, PF=PF) for RT, SKs in shapes
                    for SK in SKs for PF in (1, 2)], rows=(1,))
        return
    each = [dict(tc=False), dict(fold=True), dict(tc=True, RT=1, SK=4, U=2), None]
    body_sweep(each, [dict(fold=True, RT=RT, SK=SK, PF=PF) for RT in (1, 2)
                      for SK in (2, 4, 6, 8) for PF in (0, 1)], rows=(1,), ceiling=True)
    body_sweep(each[:2], [], rows=(1,), dt=mx.float16)


_MARK_SRC = "if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = 0u;"


def marked_launches():
    """(labels, mark, timed): mark(label) runs a no-op launch whose block count numbers the
    label (ncu_probe --parse-marked); timed(label, fn) marks, then evaluates fn(). After a
    warm-up read, so the first launches already run at full clocks."""
    mk = mx.fast.cuda_kernel(name="stream_mark", input_names=["a"], output_names=["out"],
                             source=_MARK_SRC)
    labels, one = [], mx.zeros((4,), mx.uint32)
    kern, a = stream_kernel(), mx.zeros((1 << 28,), mx.uint32)
    for _ in range(20):
        mx.eval(stream(kern, a, 4, -(-a.size // 4 // 1024)))

    def mark(label):
        labels.append(label)
        mx.eval(mk(inputs=[one], grid=(32 * len(labels), 1, 1), threadgroup=(32, 1, 1),
                   output_shapes=[(1,)], output_dtypes=[mx.uint32])[0])

    def timed(label, fn):
        mark(label)
        mx.eval(fn())

    return labels, mark, timed


def rows_sweep():
    """Small-M products (issue #4: M <= 16 against the 16-bit matmul) on the issue's five
    shapes, bfloat16 x: at M = 1, 2, 4, 8 the folded GEMV (automatic shape, the other row
    tiling, split-K halved and doubled), at M = 1-16 qmm, MLX's quantized_matmul and the
    16-bit matmul, each launch behind a numbered marker (setup work behind `setup` markers).
    The labels go to stderr as one `LABELS` JSON line."""
    import json

    from marlin_mlx.kernels.qmm import qmm_kernel
    from marlin_mlx.kernels.qmv import fold_config, qmv_kernel
    labels, mark, timed = marked_launches()

    dt = mx.bfloat16
    for K, N in ((4096, 4096), (4096, 12288), (12288, 4096), (8192, 28672), (28672, 8192)):
        mark(f"setup {K}x{N}")
        w16 = mx.random.normal((N, K)).astype(dt) * 0.02
        q, s, b = mx.quantize(w16, group_size=64, bits=4)
        mx.eval(w16, q, s, b)
        for M in (1, 2, 4, 8, 16):
            mark(f"setup {K}x{N} M{M}")
            x = mx.random.normal((M, K)).astype(dt)
            mx.eval(x)
            RT, SK, _ = fold_config(N, K, MT=M)
            tag = f"{K}x{N} M{M}"
            for rep in range(2):
                if M <= 8:
                    timed(f"{tag} fold", lambda: qmv_kernel(x, q, s, b, 64, 4, fold=True))
                    timed(f"{tag} fold-RT{3 - RT}",
                          lambda: qmv_kernel(x, q, s, b, 64, 4, fold=True, RT=3 - RT))
                    for sk in (SK // 2, SK * 2):
                        if 1 <= sk <= min(8, K // 256):
                            timed(f"{tag} fold-SK{sk}",
                                  lambda: qmv_kernel(x, q, s, b, 64, 4, fold=True, SK=sk))
                timed(f"{tag} qmm", lambda: qmm_kernel(x, q, s, b, 64, 4))
                timed(f"{tag} mlx", lambda: mx.quantized_matmul(x, q, s, b, transpose=True,
                                                                group_size=64, bits=4))
                timed(f"{tag} fp16", lambda: x @ w16.T)
    print("LABELS " + json.dumps(labels), file=sys.stderr)


def pieces_sweep():
    """One row of x: the folded GEMV reading each group's words (P16 0) against 16-byte pieces
    (P16 1; automatic shape, split-K halved and doubled, two row tiles), bfloat16 and float16,
    group sizes 64 (all five shapes) and 32 / 128 (4096 -> 12288), marked like --rows."""
    import json

    from marlin_mlx.kernels.qmv import fold_config, qmv_kernel
    labels, mark, timed = marked_launches()

    cases = [(K, N, 64, mx.bfloat16) for K, N in ((4096, 4096), (4096, 12288), (12288, 4096),
                                                  (8192, 28672), (28672, 8192))]
    cases += [(4096, 12288, 64, mx.float16), (4096, 12288, 32, mx.bfloat16),
              (4096, 12288, 128, mx.bfloat16)]
    for K, N, gs, dt in cases:
        mark(f"setup {K}x{N} g{gs}")
        q, s, b = mx.quantize(mx.random.normal((N, K)).astype(dt) * 0.02, group_size=gs, bits=4)
        x = mx.random.normal((1, K)).astype(dt)
        mx.eval(q, s, b, x)
        _, SK, _ = fold_config(N, K)
        tag = f"{K}x{N} g{gs} {str(dt).split('.')[-1]}"
        for rep in range(2):
            timed(f"{tag} P0", lambda: qmv_kernel(x, q, s, b, gs, 4, fold=True, P16=0))
            timed(f"{tag} P1", lambda: qmv_kernel(x, q, s, b, gs, 4, fold=True, P16=1))
            timed(f"{tag} P1-RT2", lambda: qmv_kernel(x, q, s, b, gs, 4, fold=True, P16=1,
                                                      RT=2))
            for sk in (SK // 2, SK * 2):
                if 1 <= sk <= min(8, K // 256):
                    timed(f"{tag} P1-SK{sk}",
                          lambda: qmv_kernel(x, q, s, b, gs, 4, fold=True, P16=1, SK=sk))
                    timed(f"{tag} P0-SK{sk}",
                          lambda: qmv_kernel(x, q, s, b, gs, 4, fold=True, P16=0, SK=sk))
    print("LABELS " + json.dumps(labels), file=sys.stderr)


def details():
    """One launch each, for Nsight Compute's sections: qmv's two bodies, qmm at one row, the
    fp16 GEMV and the stream kernel (4 loads in flight, one pass), at 4096 -> 12288 and
    28672 -> 8192."""
    from marlin_mlx.kernels.qmm import qmm_kernel
    from marlin_mlx.kernels.qmv import qmv_kernel
    kern = stream_kernel()
    dt = mx.bfloat16
    for K, N in ((4096, 12288), (28672, 8192)):
        w16 = mx.random.normal((N, K)).astype(dt) * 0.02
        q, s, b = mx.quantize(w16, group_size=64, bits=4)
        x = mx.random.normal((1, K)).astype(dt)
        a = mx.zeros(((q.nbytes + s.nbytes + b.nbytes) // 4,), mx.uint32)
        mx.eval(w16, q, s, b, x, a)
        mx.eval(qmv_kernel(x, q, s, b, 64, 4, tc=False))
        mx.eval(qmv_kernel(x, q, s, b, 64, 4, tc=True, RT=1, SK=4, U=2))
        mx.eval(qmv_kernel(x, q, s, b, 64, 4, fold=True))
        mx.eval(qmm_kernel(x, q, s, b, 64, 4))
        mx.eval(x @ w16.T)
        mx.eval(stream(kern, a, 4, -(-a.size // 4 // 1024)))
        del w16, q, s, b, a


if __name__ == "__main__":
    modes = {"--details": details, "--patterns": patterns, "--pipe": pipe_sweep,
             "--fold": fold_sweep, "--rows": rows_sweep, "--pieces": pieces_sweep,
             "--tc": tc_sweep}
    next((f for flag, f in modes.items() if flag in sys.argv), run)()
