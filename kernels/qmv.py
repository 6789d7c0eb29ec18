"""qmv: fused dequantize + matrix-vector product for small M (decode), affine format.

y = x @ dequant(w).T with w in MLX's affine layout (uint32 words packed along K, `scales` and
`biases` per group). The kernel body is `src/qmv.h`; the reference is MLX's own
`quantized_matmul`, which is also the CPU path.
"""

from __future__ import annotations

import mlx.core as mx

from .formats import validate_quantized
from .launch import KernelSpec, backend, cdiv, launch

SPEC = KernelSpec("marlin_qmv", "qmv.h", ("x", "w", "scales", "biases"), ("y",))

BITS = (2, 3, 4, 5, 6, 8)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
XKIND = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
M_TILE = 8          # rows of x one threadgroup handles; larger M tiles the grid's y axis
TARGET_WARPS = 132 * 32  # enough simdgroups in flight to cover memory latency on a big GPU


def reference(x, w, scales, biases, group_size=64, bits=4):
    """MLX's built-in quantized matmul: the CPU path and the oracle's fast twin."""
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size,
                               bits=bits, mode="affine")


def supported(x, w, scales, biases, group_size, bits) -> bool:
    """Whether the custom kernel covers these inputs (else callers use `reference`)."""
    return (bits in BITS and x.dtype in DTYPES and scales.dtype in DTYPES and biases is not None
            and biases.dtype in DTYPES and w.ndim == 2 and group_size % 32 == 0)


def config(M: int, N: int, K: int, bits: int, R: int | None = None, SK: int | None = None):
    """(rows per simdgroup, simdgroups splitting K) for a launch."""
    if R is None:
        R = 4 if M <= 4 else 2
    steps = cdiv(K // 32, 32)  # 32-lane steps along K
    if SK is None:
        SK = max(1, min(8, steps, cdiv(TARGET_WARPS, cdiv(N, R))))
    return R, max(1, min(SK, 32))


def qmv(x, w, scales, biases, group_size: int = 64, bits: int = 4, *, R: int | None = None,
        SK: int | None = None, validate: bool = True):
    """y[..., N] = x[..., K] @ dequant(w, scales, biases).T, custom kernel on a GPU."""
    if validate:
        validate_quantized(x, w, scales, biases, "affine", bits, group_size)
    if backend() is None or not supported(x, w, scales, biases, group_size, bits):
        return reference(x, w, scales, biases, group_size, bits)
    return qmv_kernel(x, w, scales, biases, group_size, bits, R=R, SK=SK)


def qmv_kernel(x, w, scales, biases, group_size, bits, *, R=None, SK=None):
    """The custom kernel alone (no validation, no fallback)."""
    K = x.shape[-1]
    N = w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    MT = x2.shape[0]
    M = min(MT, M_TILE)
    R, SK = config(M, N, K, bits, R, SK)
    template = [("T", x.dtype), ("S", scales.dtype), ("XK", XKIND[x.dtype]), ("BITS", bits),
                ("GS", group_size), ("R", R), ("SK", SK), ("M", M), ("MT", MT), ("K", K),
                ("N", N)]
    if biases.dtype != scales.dtype:
        biases = biases.astype(scales.dtype)
    (y,) = launch(SPEC, [x2, w, scales, biases], template,
                  grid=(32 * SK * cdiv(N, R), cdiv(MT, M), 1), threadgroup=(32 * SK, 1, 1),
                  output_shapes=[(MT, N)], output_dtypes=[x.dtype])
    return y.reshape(*lead, N)


def template_for(x_dtype, s_dtype, bits, group_size, M, MT, K, N, R=None, SK=None):
    """The template list a launch would use (for the compile checks)."""
    R, SK = config(M, N, K, bits, R, SK)
    return [("T", x_dtype), ("S", s_dtype), ("XK", XKIND[x_dtype]), ("BITS", bits),
            ("GS", group_size), ("R", R), ("SK", SK), ("M", M), ("MT", MT), ("K", K), ("N", N)]
