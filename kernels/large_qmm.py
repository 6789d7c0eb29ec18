"""large_qmm: the 4-bit affine product for many rows of x (prefill) on warpgroup tensor cores.

Past qmm's 64 rows, the quantized product used to be the dequantize kernel followed by MLX's
matmul: the whole weight matrix written in 16 bits and read back (at M = 512, 8192 -> 28672 on
an H200: 665 µs against 445 µs for the bf16 matmul alone). Here one launch reads the 4-bit
weights in MLX's layout, dequantizes them in registers as the A operand of Hopper's wgmma, and
takes x from shared memory (body `src/large_qmm.h`). x is first permuted within each 128
values of K into the order the decode produces (`permute_x`, one copy of x). On GPUs without
wgmma (and on Metal, in the emulator) the same body runs per-warp m16n8k16 products: correct,
not fast, so the measured selection keeps dequantize + matmul there.
"""

from __future__ import annotations

import mlx.core as mx

from .formats import reference_matmul
from .launch import (KernelSpec, backend, cdiv, cuda_plan_kernel, launch_planned, rows_input)

INPUTS = ("x", "w", "scales", "biases", "rows")
SPEC_PERMUTE = KernelSpec("marlin_large_qmm_permute", "large_qmm_permute.h", ("x", "rows"), ("xp",))
X_DTYPES = (mx.float16, mx.bfloat16)
S_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
XKIND = {mx.float16: 1, mx.bfloat16: 2}
BITS = 4
METAL_SHARED = 32768  # Metal's threadgroup memory limit


def reference(x, w, scales, biases, group_size=64, bits=BITS):
    return reference_matmul(x, w, scales, biases, "affine", bits, group_size)


def supported(x, w, scales, biases, group_size, bits) -> bool:
    """4-bit affine weights (N, K) with biases, 16-bit x of K values, K a multiple of 128."""
    K = x.shape[-1]
    return (x.dtype in X_DTYPES and bits == BITS and biases is not None and w.ndim == 2
            and K % 128 == 0 and group_size % 32 == 0 and K % group_size == 0
            and w.shape[-1] == K * BITS // 32 and scales.dtype in S_DTYPES
            and biases.dtype == scales.dtype and scales.shape == (w.shape[0], K // group_size))


def permute_x(x):
    """x (M, K) with each 128 values of K in the kernel's order. Value k = 32 c + 16 h + 8 a +
    4 e + 2 b + t of a block (chunk c, half h, pair word a, high/low e, pair bits b, t) goes to
    slot 64 h + 32 a + 16 b + 8 t + 2 c + e: product 4 h + 2 a + b, fragment slot 8 t + 2 c + e
    (lane c of a quad holds slots 2 c, 2 c + 1 and 2 c + 8, 2 c + 9)."""
    M, K = x.shape
    return (x.reshape(M, K // 128, 4, 2, 2, 2, 2, 2)
            .transpose(0, 1, 3, 4, 6, 7, 2, 5).reshape(M, K))


def permute_kernel(x):
    """permute_x as one custom launch (a thread per 16 bytes; MLX's 8-axis transpose copy
    measured 63 µs for x of 512 x 8192 on the H200, a tenth of the product)."""
    M, K = x.shape
    template = [("T", x.dtype), ("K", K)]
    threads = M * (K // 8)
    kern, ktemplate = (cuda_plan_kernel(SPEC_PERMUTE, template) if backend() == "cuda"
                       else (None, None))
    return launch_planned(SPEC_PERMUTE, [x, rows_input(M)], template, (cdiv(threads, 256) * 256, 1, 1),
                          (256, 1, 1), [(M, K)], [x.dtype], kern, ktemplate)[0]


def config(M: int, N: int, be: str | None = None) -> tuple[int, int, int, int]:
    """(64-row weight tiles per warpgroup MW, x rows per threadgroup NX, warpgroups WG, stages
    ST). CUDA: 256 weight rows x 128 x rows a threadgroup, three 32 KB stages of x (one in
    flight while one is multiplied; 3 measured faster than 4 and 5 on the H200). Metal keeps
    its 32 KB of threadgroup memory: 64 x rows, two stages."""
    if (be or backend()) == "metal":
        return 1, 64, 2, 2
    return 2, (128 if M > 64 else 64), 2, 3


def shared_bytes(NX: int, ST: int, be: str) -> int:
    return ST * NX * 256 + (1024 if be == "cuda" else 0)


def spec(NX: int, ST: int, be: str) -> KernelSpec:
    """The kernel spec; on CUDA its dynamic shared memory (bytes) is part of the kernel object."""
    return KernelSpec("marlin_large_qmm", "large_qmm.h", INPUTS, ("y",),
                      shared_bytes(NX, ST, be) if be == "cuda" else 0)


def plan(xdt, sdt, group_size, M, K, N, MW=None, NX=None, WG=None, ST=None, be=None):
    """(spec, template, grid, threadgroup) of a launch."""
    be = be or backend() or "cuda"
    dMW, dNX, dWG, dST = config(M, N, be)
    MW, NX, WG, ST = MW or dMW, NX or dNX, WG or dWG, ST or dST
    if NX not in (64, 128) or MW not in (1, 2) or WG not in (1, 2) or ST < 2:
        raise ValueError(f"large_qmm: unsupported tiling MW={MW} NX={NX} WG={WG} ST={ST} "
                         "(MW 1 or 2, NX 64 or 128, WG 1 or 2, ST at least 2)")
    if be == "metal" and shared_bytes(NX, ST, be) > METAL_SHARED:
        raise ValueError(f"large_qmm: {NX} rows x {ST} stages exceed Metal's threadgroup memory")
    template = [("T", xdt), ("S", sdt), ("XK", XKIND[xdt]), ("GS", group_size), ("K", K),
                ("N", N), ("MW", MW), ("NX", NX), ("WG", WG), ("ST", ST)]
    grid = (128 * WG * cdiv(M, NX), cdiv(N, 64 * MW * WG), 1)
    return spec(NX, ST, be), template, grid, (128 * WG, 1, 1)


def large_qmm_kernel(x, w, scales, biases, group_size, bits=BITS, **tiling):
    """The custom kernel alone (no checks): x (..., K) 16-bit, in natural order."""
    lead, K = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, K)
    M, N = x.shape[0], w.shape[0]
    sp, template, grid, tg = plan(x.dtype, scales.dtype, group_size, M, K, N, **tiling)
    kern, ktemplate = cuda_plan_kernel(sp, template) if backend() == "cuda" else (None, None)
    return launch_planned(sp, [permute_kernel(x), w, scales, biases, rows_input(M)], template, grid,
                          tg, [(M, N)], [x.dtype], kern, ktemplate)[0].reshape(*lead, N)


def large_qmm(x, w, scales, biases, group_size: int = 64, bits: int = BITS):
    """y = x @ dequantize(w).T for x (..., K): the kernel where it applies, else the reference."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"large_qmm: unsupported bits {bits}")
    if backend() is None or not supported(x, w, scales, biases, group_size, bits):
        return reference(x, w, scales, biases, group_size, bits)
    return large_qmm_kernel(x, w, scales, biases, group_size, bits)


def compile_cases():
    """Metal/CUDA compile checks: both 16-bit kinds, the CUDA tiling and the Metal one, g64 and
    g128, a shape whose N is not a multiple of the weight tile."""
    out = []
    for name, dt, sdt, gs, K, N, be in (("bf16", mx.bfloat16, mx.bfloat16, 64, 4096, 12288, "cuda"),
                                        ("f16-g128", mx.float16, mx.float16, 128, 8192, 1000, "cuda"),
                                        ("metal-bf16", mx.bfloat16, mx.float32, 64, 4096, 4096, "metal")):
        sp, t = plan(dt, sdt, gs, 512, K, N, be=be)[:2]
        out.append((f"large-qmm-{name}", sp, [dt, mx.uint32, sdt, sdt, mx.int32],
                    [1 << 20, 1 << 20, 1 << 16, 1 << 16, 8], [dt], t))
    for dt in X_DTYPES:
        out.append((f"large-qmm-permute-{dt}".replace("mlx.core.", ""), SPEC_PERMUTE,
                    [dt, mx.int32], [1 << 20, 8], [dt], [("T", dt), ("K", 4096)]))
    return out
