"""dequantize: affine-format weights back to a dense float matrix, as a GPU kernel.

For large M the fastest quantized matmul is often this kernel followed by MLX's native
(tensor-core) matmul. Body: `src/dequantize.h`; reference: `formats.dequantize` /
`mx.dequantize` (also the CPU path).
"""

from __future__ import annotations

import mlx.core as mx

from .formats import validate_weights
from .launch import KernelSpec, backend, cdiv, launch
from .qmv import BITS, DTYPES, XKIND

SPEC = KernelSpec("marlin_dequant", "dequantize.h", ("w", "scales", "biases"), ("out",))
THREADS = 256


def reference(w, scales, biases, group_size=64, bits=4, dtype=None):
    y = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode="affine")
    return y if dtype is None else y.astype(dtype)


def dequantize(w, scales, biases, group_size: int = 64, bits: int = 4, dtype=None,
               validate: bool = True):
    """Dense (N, K) weights in `dtype` (default: the scales' dtype)."""
    if validate:
        validate_weights(w, scales, biases, "affine", bits, group_size)
    dtype = scales.dtype if dtype is None else dtype
    if (backend() is None or bits not in BITS or dtype not in DTYPES or w.ndim != 2
            or scales.dtype not in DTYPES or biases is None or group_size % 32):
        return reference(w, scales, biases, group_size, bits, dtype)
    return dequantize_kernel(w, scales, biases, group_size, bits, dtype)


def dequantize_kernel(w, scales, biases, group_size, bits, dtype):
    N = w.shape[0]
    K = w.shape[1] * 32 // bits
    nch = N * K // 32
    if biases.dtype != scales.dtype:
        biases = biases.astype(scales.dtype)
    template = [("T", dtype), ("XK", XKIND[dtype]), ("BITS", bits), ("GS", group_size),
                ("K", K), ("NCH", nch)]
    (out,) = launch(SPEC, [w, scales, biases], template, grid=(cdiv(nch, THREADS) * THREADS, 1, 1),
                    threadgroup=(THREADS, 1, 1), output_shapes=[(N, K)], output_dtypes=[dtype])
    return out


def template_for(dtype, bits, group_size, N, K):
    return [("T", dtype), ("XK", XKIND[dtype]), ("BITS", bits), ("GS", group_size), ("K", K),
            ("NCH", N * K // 32)]
