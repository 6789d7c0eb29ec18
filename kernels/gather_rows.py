"""gather_rows: rows of a matrix by index, with out-of-range indices giving zero rows.

`x[idx]` on MLX's CUDA backend copies element by element (~0.35 TB/s for the MoE prefill's
expert blocks of GLM-4.7-Flash: 50 MB in ~140 µs on an H200); this kernel copies 16 bytes a
thread. The zero rows replace a concatenated zero row (the padding of kernels/moe_experts.py's
expert blocks). Body `src/gather_rows.h`; the reference (CPU path) is plain MLX indexing.
"""

from __future__ import annotations

import mlx.core as mx

from .launch import KernelSpec, backend, cdiv, launch

SPEC = KernelSpec("marlin_gather_rows", "gather_rows.h", ("x", "idx", "meta"), ("out",))
THREADS = 256


def reference(x, idx):
    n, D = x.shape
    return mx.concatenate([x, mx.zeros((1, D), x.dtype)])[mx.minimum(idx, n)]


def gather_rows(x, idx):
    """out (len(idx), D): out[r] = x[idx[r]] for idx[r] < len(x), else zeros. x 2-D, idx 1-D
    uint32."""
    if x.ndim != 2 or idx.ndim != 1:
        raise ValueError(f"gather_rows: x must be 2-D and idx 1-D, got {x.shape} and {idx.shape}")
    n, D = x.shape
    if backend() is None or (D * x.dtype.size) % 16 or idx.size == 0:
        return reference(x, idx.astype(mx.uint32))
    W4 = D * x.dtype.size // 16
    rows = idx.size
    meta = mx.array([n, rows], dtype=mx.int32)
    return launch(SPEC, [x, idx.astype(mx.uint32), meta], [("W4", W4)],
                  (cdiv(rows * W4, THREADS) * THREADS, 1, 1), (THREADS, 1, 1), [(rows, D)],
                  [x.dtype])[0]


def compile_cases():
    return [("gather-rows", SPEC, [mx.bfloat16, mx.uint32, mx.int32], [1 << 20, 1 << 12, 8],
             [mx.bfloat16], [("W4", 256)])]
