"""gated_mlp: silu(x @ Wg.T) * (x @ Wu.T) for affine-quantized gate/up weights, fused.

One launch reads both weights once and applies SiLU·mul before writing: the decode-time
gate+up projections of a Llama/Qwen MLP. Body: `src/gated_mlp.h` (the qmv body with a second
weight set); reference: two MLX quantized matmuls and the activation (also the CPU path).
"""

from __future__ import annotations

import mlx.core as mx

from .formats import validate_quantized
from .launch import KernelSpec, backend, launch_planned
from . import qmv as _qmv
from .qmv import M_TILE, supported

SPEC = KernelSpec("marlin_gated_mlp", "gated_mlp.h",
                  ("x", "w", "scales", "biases", "w2", "scales2", "biases2"), ("y",))


def reference(x, gate, up, group_size=64, bits=4):
    """gate/up: (w, scales, biases) triples."""
    g = mx.quantized_matmul(x, *gate, transpose=True, group_size=group_size, bits=bits)
    u = mx.quantized_matmul(x, *up, transpose=True, group_size=group_size, bits=bits)
    return g * mx.sigmoid(g) * u


def gated_mlp(x, gate, up, group_size: int = 64, bits: int = 4, *, R=None, SK=None,
              validate: bool = True):
    if validate:
        N1, _ = validate_quantized(x, *gate, "affine", bits, group_size)
        N2, _ = validate_quantized(x, *up, "affine", bits, group_size)
        if N1 != N2:
            raise ValueError(f"up: expected {N1} output rows like gate, found {N2}")
    M = x.size // x.shape[-1]
    if (backend() is None or M > M_TILE or not supported(x, *gate, group_size, bits)
            or not supported(x, *up, group_size, bits)):
        return reference(x, gate, up, group_size, bits)
    return gated_mlp_kernel(x, gate, up, group_size, bits, R=R, SK=SK)


_PLANS: dict = {}


def _plan(xdt, sdt, bits, group_size, xshape, N, R, SK, PF):
    """As qmv._plan: cached per x shape; x and y keep their leading dims (no reshapes)."""
    PF = _qmv.PREFETCH if PF is None else PF
    key = (xdt, sdt, bits, group_size, xshape, N, R, SK, PF)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _qmv.build_plan(SPEC, xdt, sdt, bits, group_size, xshape, N, R, SK,
                                             PF, gated=True)
    return plan


def gated_mlp_kernel(x, gate, up, group_size, bits, *, R=None, SK=None, PF=None):
    w, s, b = gate
    w2, s2, b2 = up
    sdt = s.dtype
    if b.dtype != sdt or s2.dtype != sdt or b2.dtype != sdt:
        b, s2, b2 = (a.astype(sdt) for a in (b, s2, b2))
    template, grid, tg, oshape, odt, kern, ktemplate = _plan(x.dtype, sdt, bits, group_size,
                                                             x.shape, w.shape[0], R, SK, PF)
    inputs = [x, w, s, b, w2, s2, b2]
    return launch_planned(SPEC, inputs, template, grid, tg, oshape, odt, kern, ktemplate)[0]


def template_for(x_dtype, s_dtype, bits, group_size, M, MT, K, N, PF=None):
    return _plan(x_dtype, s_dtype, bits, group_size, (MT, K), N, None, None, PF)[0]
