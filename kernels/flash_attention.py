"""flash_prefill: causal attention for many queries with large heads, one fused launch.

MLX's CUDA `scaled_dot_product_attention` fuses heads of at most 128 (cuDNN); larger ones fall
back to a score matrix in memory, a mask select and a softmax. GLM-4.7-Flash's prefill has
query/key heads of 256 (192 + 64 rope) and value heads of 256: at 2048 tokens that fallback
took ~1.5 ms a layer on an H200 (benchmarks/results/prefill_probe_glm_s10_h200.json). This op
computes it in one pass over the keys on tensor cores (body `src/flash_prefill.h`); the
reference is MLX's own attention, which is also the CPU path.
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import selection
from .launch import KernelSpec, backend, cdiv, launch

SPEC = KernelSpec("marlin_flash_prefill", "flash_prefill.h", ("q", "k", "v", "meta", "scale"),
                  ("o",))
DTYPES = (mx.float16, mx.bfloat16)
XKIND = {mx.float16: 1, mx.bfloat16: 2}
BQ = 64          # queries per threadgroup (4 simdgroups of 16 rows)
FUSED_MAX = 128  # the largest head MLX's CUDA attention fuses (cuDNN); above it, this op
MAX_D = 256      # the q rows live in registers: D / 16 x 4 words per lane
# Output columns per threadgroup (the float accumulator: DVB / 2 registers per lane). 256: one
# pass computes all of GLM's value head, 522 µs at 2048 tokens against 625 µs for two passes of
# 128 (which recompute the scores; benchmarks/results/flash_attention_h200.json).
DVB_MAX = 256
TOL = {mx.float16: 5e-3, mx.bfloat16: 2e-2}  # self-test against float32 attention


def reference(q, k, v, scale):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")


def supported(q, k, v) -> bool:
    """Shapes the kernel covers: 4-D, 16-bit, L <= S, D <= 256 in steps of 16, DV in steps of
    8, H a multiple of the key/value heads."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or q.dtype not in DTYPES:
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    B, H, L, D = q.shape
    _, HK, S, DV = v.shape
    return (k.shape == (B, HK, S, D) and v.shape[0] == B and H % HK == 0 and 1 < L <= S
            and D % 16 == 0 and D <= MAX_D and DV % 8 == 0)


def dv_block(DV: int, DVB: int | None = None) -> int:
    if DVB is None:
        DVB = DV
        while DVB > DVB_MAX and DVB % 16 == 0:
            DVB //= 2
    if DV % DVB or DVB % 8:
        raise ValueError(f"DVB {DVB} must divide DV {DV} and be a multiple of 8")
    return DVB


def plan(q, k, v, DVB: int | None = None):
    """(template, grid, threadgroup, output shape) of a launch."""
    B, H, L, D = q.shape
    HK, DV = v.shape[1], v.shape[-1]
    DVB = dv_block(DV, DVB)
    template = [("T", q.dtype), ("XK", XKIND[q.dtype]), ("D", D), ("DV", DV), ("DVB", DVB),
                ("H", H), ("HK", HK)]
    return template, (128 * cdiv(L, BQ), B * H * (DV // DVB), 1), (128, 1, 1), (B, H, L, DV)


def flash_prefill_kernel(q, k, v, scale: float, DVB: int | None = None):
    """The custom kernel alone (no checks, no fallback)."""
    template, grid, tg, oshape = plan(q, k, v, DVB)
    meta = mx.array([q.shape[2], k.shape[2]], dtype=mx.int32)
    sl2 = mx.array([scale * math.log2(math.e)], dtype=mx.float32)
    return launch(SPEC, [q, k, v, meta, sl2], template, grid, tg, [oshape], [q.dtype])[0]


def flash_attention(q, k, v, scale: float):
    """Causal attention of q (B, H, L, D) over k (B, HK, S, D), v (B, HK, S, DV): the custom
    kernel on a GPU where it is supported and the first-use self-test chose it, else MLX's."""
    if backend() is None or not supported(q, k, v) or not _decide(q, k, v):
        return reference(q, k, v, scale)
    return flash_prefill_kernel(q, k, v, scale)


def _decide(q, k, v) -> bool:
    """Checked against float32 attention and timed against MLX's once per head shape."""
    H, D = q.shape[1], q.shape[-1]
    HK, DV = v.shape[1], v.shape[-1]
    dt = q.dtype
    cls = f"H{H}-HK{HK}-D{D}-DV{DV}-{dt}".replace("mlx.core.", "")
    n = 1024

    def make_inputs():
        return (mx.random.normal((1, H, n, D)).astype(dt), mx.random.normal((1, HK, n, D)).astype(dt),
                mx.random.normal((1, HK, n, DV)).astype(dt))

    s = D ** -0.5

    def oracle(a, b, c):
        return reference(a.astype(mx.float32), b.astype(mx.float32), c.astype(mx.float32), s)

    return selection.use_custom("flash_prefill", "attention", cls, make_inputs,
                                lambda a, b, c: flash_prefill_kernel(a, b, c, s),
                                lambda a, b, c: reference(a, b, c, s), oracle, TOL[dt])


def compile_cases():
    """Metal/CUDA compile checks: GLM-4.7-Flash's prefill heads in both 16-bit kinds, and a
    small odd case (D = 48, DV = 40, grouped heads)."""
    out = []
    for name, dt, H, HK, D, DV in (("glm-bf16", mx.bfloat16, 20, 20, 256, 256),
                                   ("glm-f16", mx.float16, 20, 20, 256, 256),
                                   ("small-gqa", mx.bfloat16, 4, 2, 48, 40)):
        q = mx.zeros((1, H, 100, D), dt)
        k = mx.zeros((1, HK, 130, D), dt)
        v = mx.zeros((1, HK, 130, DV), dt)
        t = plan(q, k, v)[0]
        out.append((f"flash-prefill-{name}", SPEC, [dt, dt, dt, mx.int32, mx.float32],
                    [1 << 20] * 3 + [8, 8], [dt], t))
    return out
