"""qmm: fused dequantize + tensor-core matrix product for small M (2 to 64 rows), affine format.

Where qmv (one row of x at a time through float FMAs) stops scaling, a batched decode step of
8-64 sequences still reads every weight once: this op dequantizes each weight in registers and
multiplies it into up to 64 rows with m16n8k16 tensor-core products (PTX `mma.sync` on CUDA; on
Metal the same fragments through lane shuffles, see prelude_metal.h). Weights stay in MLX's
layout. Body: `src/qmm.h`; reference: MLX's own `quantized_matmul` (also the CPU path).
"""

from __future__ import annotations

import os

import mlx.core as mx

from .formats import validate_quantized
from .launch import (KernelSpec, backend, cdiv, cuda_plan_kernel, launch_planned, prod,
                     rows_input)
from .qmv import DTYPES as S_DTYPES

SPEC = KernelSpec("marlin_qmm", "qmm.h", ("x", "w", "scales", "biases", "rows"), ("y",))

BITS = (2, 3, 4, 5, 6, 8)
X_DTYPES = (mx.float16, mx.bfloat16)  # the tensor cores' 16-bit inputs
XKIND = {mx.float16: 1, mx.bfloat16: 2}
MAX_M = 64
SHARED_BYTES = 32 * 1024   # the split-K buffer fits Metal's threadgroup memory
MAX_SK = 8
# Simdgroups in flight to cover memory latency (H200: 132 SMs); tunable for the benchmarks.
TARGET_WARPS = int(132 * 16 * float(os.environ.get("MARLIN_MLX_QMM_TW", "1")))


def reference(x, w, scales, biases, group_size=64, bits=4):
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size,
                               bits=bits, mode="affine")


def supported(x, w, scales, biases, group_size, bits) -> bool:
    """Whether the kernel covers these inputs (else callers use `reference`)."""
    return (bits in BITS and x.dtype in X_DTYPES and scales.dtype in S_DTYPES
            and biases is not None and biases.dtype in S_DTYPES and w.ndim == 2
            and group_size % 32 == 0 and 1 <= prod(x.shape[:-1]) <= MAX_M)


def config(MT: int, N: int, K: int, NT: int | None = None, SK: int | None = None):
    """(8-row weight tiles per threadgroup, simdgroups splitting K) for a launch."""
    mtiles = cdiv(MT, 16)
    if NT is None:
        NT = 4 if mtiles <= 2 else 2
    steps = cdiv(K // 32, 4)
    room = max(1, SHARED_BYTES // (4 * 16 * mtiles * 8 * NT))
    if SK is None:
        SK = cdiv(TARGET_WARPS, cdiv(N, 8 * NT))
    # at most 256 threads: the kernel takes 130-170 registers at 8 bits, and a 512-thread
    # threadgroup of those does not fit an SM's register file (the launch fails)
    return NT, max(1, min(SK, steps, room, MAX_SK))


def qmm(x, w, scales, biases, group_size: int = 64, bits: int = 4, *, NT: int | None = None,
        SK: int | None = None, validate: bool = True):
    """y[..., N] = x[..., K] @ dequant(w, scales, biases).T, custom kernel on a GPU."""
    if validate:
        validate_quantized(x, w, scales, biases, "affine", bits, group_size)
    if backend() is None or not supported(x, w, scales, biases, group_size, bits):
        return reference(x, w, scales, biases, group_size, bits)
    return qmm_kernel(x, w, scales, biases, group_size, bits, NT=NT, SK=SK)


_PLANS: dict = {}


def plan(xdt, sdt, bits, group_size, xshape, N, NT=None, SK=None):
    """(template, grid, threadgroup, output shapes, output dtypes, kernel object, its template,
    rows input), cached per x shape (as qmv's plans: the host cost of a launch counts at
    decode). The template holds the number of 16-row tiles, not the row count, so batches of
    different sizes share a compiled kernel."""
    key = (xdt, sdt, bits, group_size, xshape, N, NT, SK)
    p = _PLANS.get(key)
    if p is None:
        K, lead = xshape[-1], tuple(xshape[:-1])
        MT = prod(lead)
        NT, SK = config(MT, N, K, NT, SK)
        template = [("T", xdt), ("S", sdt), ("XK", XKIND[xdt]), ("BITS", bits),
                    ("GS", group_size), ("NT", NT), ("SK", SK), ("MTILES", cdiv(MT, 16)),
                    ("K", K), ("N", N)]
        kern, ktemplate = (cuda_plan_kernel(SPEC, template) if backend() == "cuda"
                           else (None, None))
        p = _PLANS[key] = (template, (32 * SK * cdiv(N, 8 * NT), 1, 1), (32 * SK, 1, 1),
                           [(*lead, N)], [xdt], kern, ktemplate, rows_input(MT))
    return p


def qmm_kernel(x, w, scales, biases, group_size, bits, *, NT=None, SK=None):
    """The custom kernel alone (no validation, no fallback)."""
    sdt = scales.dtype
    template, grid, tg, oshape, odt, kern, ktemplate, rows = plan(
        x.dtype, sdt, bits, group_size, x.shape, w.shape[0], NT, SK)
    if biases.dtype != sdt:
        biases = biases.astype(sdt)
    return launch_planned(SPEC, [x, w, scales, biases, rows], template, grid, tg, oshape, odt,
                          kern, ktemplate)[0]


def compile_cases():
    """Metal/CUDA compile checks (tests/test_metal_compile.py): every bit width, both 16-bit
    kinds, one and four 16-row tiles."""
    out = []
    for bits in BITS:
        for dt in X_DTYPES:
            for MT in (16, 64):
                t = plan(dt, dt, bits, 64, (MT, 4096), 12288)[0]
                out.append((f"qmm-b{bits}-{dt}-M{MT}".replace("mlx.core.", ""), SPEC,
                            [dt, mx.uint32, dt, dt, mx.int32], [1 << 20] * 4 + [8], [dt], t))
    return out
