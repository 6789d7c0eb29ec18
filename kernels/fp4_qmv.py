"""fp4_qmv: fused dequantize + matrix-vector product for the FP4 formats (mxfp4, nvfp4).

y = x @ dequant(w).T with w in MLX's layout for `mode="mxfp4"` (E2M1 codes, E8M0 scale per 32)
or `mode="nvfp4"` (E2M1 codes, E4M3 scale per 16), no biases. Body: `src/qmv_fp4.h`;
reference: MLX's own `quantized_matmul` in that mode (also the CPU path); the oracle of the
tests is `formats.reference_matmul` (float32 dequantization).
"""

from __future__ import annotations

import mlx.core as mx

from .formats import validate_quantized
from .launch import KernelSpec, backend, cdiv, cuda_plan_kernel, launch_planned, prod
from .qmv import DTYPES, M_TILE, XKIND, config

SPEC = KernelSpec("marlin_qmv_fp4", "qmv_fp4.h", ("x", "w", "scales"), ("y",))
FORMATS = {"mxfp4": (0, 32), "nvfp4": (1, 16)}  # mode -> (FMT constant, group size)


def reference(x, w, scales, mode="mxfp4"):
    gs = FORMATS[mode][1]
    return mx.quantized_matmul(x, w, scales, None, transpose=True, group_size=gs, bits=4,
                               mode=mode)


def supported(x, w, scales, mode) -> bool:
    return (mode in FORMATS and x.dtype in DTYPES and w.ndim == 2 and scales.dtype == mx.uint8
            and x.shape[-1] % 32 == 0)


def fp4_qmv(x, w, scales, mode: str = "mxfp4", *, validate: bool = True):
    """y[..., N] = x[..., K] @ dequant(w, scales).T; the custom kernel on a GPU."""
    if mode not in FORMATS:
        raise ValueError(f"mode: expected one of {', '.join(FORMATS)}, found {mode!r}")
    gs = FORMATS[mode][1]
    if validate:
        validate_quantized(x, w, scales, None, mode, 4, gs)
    if backend() is None or not supported(x, w, scales, mode):
        return reference(x, w, scales, mode)
    return fp4_qmv_kernel(x, w, scales, mode)


_PLANS: dict = {}


def _plan(xdt, mode, xshape, N, R=None, SK=None):
    """As qmv._plan: cached per x shape; x and y keep their leading dims (no reshapes)."""
    key = (xdt, mode, xshape, N, R, SK)
    plan = _PLANS.get(key)
    if plan is None:
        K, lead = xshape[-1], tuple(xshape[:-1])
        MT = prod(lead)
        M = min(MT, M_TILE)
        R, SK = config(M, N, K, 4, R, SK)
        template = [("T", xdt), ("XK", XKIND[xdt]), ("FMT", FORMATS[mode][0]), ("R", R),
                    ("SK", SK), ("M", M), ("MT", MT), ("K", K), ("N", N)]
        kern, ktemplate = (cuda_plan_kernel(SPEC, template) if backend() == "cuda"
                           else (None, None))
        plan = _PLANS[key] = (template, (32 * SK * cdiv(N, R), cdiv(MT, M), 1), (32 * SK, 1, 1),
                              [(*lead, N)], [xdt], kern, ktemplate)
    return plan


def fp4_qmv_kernel(x, w, scales, mode, *, R=None, SK=None):
    """The custom kernel alone (no validation, no fallback)."""
    template, grid, tg, oshape, odt, kern, ktemplate = _plan(x.dtype, mode, x.shape, w.shape[0],
                                                             R, SK)
    return launch_planned(SPEC, [x, w, scales], template, grid, tg, oshape, odt, kern,
                          ktemplate)[0]


def template_for(x_dtype, mode, M, MT, K, N):
    return _plan(x_dtype, mode, (MT, K), N)[0]


def compile_cases():
    """Metal/CUDA compile checks (tests/test_metal_compile.py)."""
    out = []
    for mode in FORMATS:
        for dt in DTYPES:
            for M in (1, 4):
                t = template_for(dt, mode, M, M, 4096, 12288)
                out.append((f"fp4qmv-{mode}-{dt}-M{M}".replace("mlx.core.", ""), SPEC,
                            [dt, mx.uint32, mx.uint8], [1 << 20] * 3, [dt], t))
    return out
