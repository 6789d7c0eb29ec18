"""gated_mlp: silu(x @ Wg.T) * (x @ Wu.T) for affine-quantized gate/up weights, fused.

One launch reads both weights once and applies SiLU·mul before writing: the decode-time
gate+up projections of a Llama/Qwen MLP. Body: `src/gated_mlp.h` (the qmv body with a second
weight set); reference: two MLX quantized matmuls and the activation (also the CPU path).
"""

from __future__ import annotations

import mlx.core as mx

from .formats import validate_quantized
from .launch import KernelSpec, backend, cdiv, launch
from .qmv import M_TILE, XKIND, config, supported

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


def gated_mlp_kernel(x, gate, up, group_size, bits, *, R=None, SK=None):
    w, s, b = gate
    w2, s2, b2 = up
    K = x.shape[-1]
    N = w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    MT = x2.shape[0]
    M = min(MT, M_TILE)
    R, SK = config(M, 2 * N, K, bits, R, SK)
    R = max(1, R // 2)  # each simdgroup reads R gate rows and R up rows
    b, s2, b2 = (a.astype(s.dtype) if a.dtype != s.dtype else a for a in (b, s2, b2))
    template = [("T", x.dtype), ("S", s.dtype), ("XK", XKIND[x.dtype]), ("BITS", bits),
                ("GS", group_size), ("R", R), ("SK", SK), ("PF", 0), ("M", M), ("MT", MT),
                ("K", K), ("N", N)]
    (y,) = launch(SPEC, [x2, w, s, b, w2, s2, b2], template,
                  grid=(32 * SK * cdiv(N, R), cdiv(MT, M), 1), threadgroup=(32 * SK, 1, 1),
                  output_shapes=[(MT, N)], output_dtypes=[x.dtype])
    return y.reshape(*lead, N)


def template_for(x_dtype, s_dtype, bits, group_size, M, MT, K, N):
    R, SK = config(M, 2 * N, K, bits)
    return [("T", x_dtype), ("S", s_dtype), ("XK", XKIND[x_dtype]), ("BITS", bits),
            ("GS", group_size), ("R", max(1, R // 2)), ("SK", SK), ("PF", 0), ("M", M),
            ("MT", MT), ("K", K), ("N", N)]
