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
# The same kernel with one more, unread input: an element of the activations the result is
# multiplied with, so the dequantization is scheduled after them. Without it, every layer's
# dequantize is a graph root and MLX may run many of them ahead of their matmuls (a Qwen3-8B
# prefill peaked at 20 GB instead of 12).
SPEC_AFTER = KernelSpec("marlin_dequant_after", "dequantize.h",
                        ("w", "scales", "biases", "after"), ("out",))
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


def dequantize_kernel(w, scales, biases, group_size, bits, dtype, after=None):
    """`after`: an array the launch must wait for (its first element is passed, unread)."""
    N = w.shape[0]
    K = w.shape[1] * 32 // bits
    nch = N * K // 32
    if biases.dtype != scales.dtype:
        biases = biases.astype(scales.dtype)
    template = [("T", dtype), ("XK", XKIND[dtype]), ("BITS", bits), ("GS", group_size),
                ("K", K), ("NCH", nch)]
    spec, inputs = SPEC, [w, scales, biases]
    if after is not None:
        spec, inputs = SPEC_AFTER, inputs + [after.reshape(-1)[:1]]
    threads = nch * (4 if unit8(bits, dtype) else 1)
    (out,) = launch(spec, inputs, template, grid=(cdiv(threads, THREADS) * THREADS, 1, 1),
                    threadgroup=(THREADS, 1, 1), output_shapes=[(N, K)], output_dtypes=[dtype])
    return out


def unit8(bits, dtype) -> bool:
    """The body's UNIT8 path (a thread per 8 codes): 2/4/8 bits into a 16-bit dtype."""
    return bits in (2, 4, 8) and dtype != mx.float32


def template_for(dtype, bits, group_size, N, K):
    return [("T", dtype), ("XK", XKIND[dtype]), ("BITS", bits), ("GS", group_size), ("K", K),
            ("NCH", N * K // 32)]


def compile_cases():
    """The dependency-carrying variant (the plain one is in tests/test_metal_compile.py)."""
    import mlx.core as _mx
    return [(f"dequant-after-{dt}".replace("mlx.core.", ""), SPEC_AFTER,
             [_mx.uint32, dt, dt, dt], [1 << 20, 1 << 16, 1 << 16, 1], [dt],
             template_for(dt, 4, 64, 4096, 4096)) for dt in (_mx.float16, _mx.bfloat16)]
