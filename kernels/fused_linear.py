"""Decode-time GEMVs with their neighbours fused in: the RMSNorm in front, the residual behind.

A batch-1 decode step of a Llama/Qwen3 layer is norm -> q/k/v GEMV, ..., o_proj GEMV -> add,
norm -> gate/up GEMV -> down GEMV -> add. On the H200 the norms and adds were 146 launches
(~0.33 ms) of a 4.4 ms Qwen3-8B step, and every launch is also host time. Here:

- `norm_linear(x, norm_w, eps, layer)`: layer(rms_norm(x)) as one launch (`src/qmv_norm.h`).
  The GEMV reads x raw, multiplies it by the norm weight as it loads it, sums x^2 on the way
  (every threadgroup covers all of K) and scales each finished dot product by 1/rms(x).
- `linear_residual(x, layer, res)`: res + layer(x) as one launch (`src/qmv_res.h`).
- `norm_swiglu(x, norm_w, eps, gate, up)`: silu(gate(n)) * up(n) with n = rms_norm(x), one
  launch over both weights (`src/gated_norm.h`).

Each returns None when it does not apply (CPU backend, not a bias-free affine QuantizedLinear,
more than one row where the folded body does not take the launch, dtypes that differ, or the
measured selection kept MLX's ops for this shape) and the caller runs the unfused ops. The
selection times each fused launch against the MLX ops it replaces (rms_norm +
quantized_matmul, quantized_matmul + add) after checking it against a float32 reference, once
per shape, like every kernel here.
"""

from __future__ import annotations

import math
import os
import struct

import mlx.core as mx

from . import qmv as _qmv
from . import quantized_linear as _ql
from . import selection
from .formats import reference_matmul
from .launch import KernelSpec, backend, launch_planned

SPEC_NORM = KernelSpec("marlin_qmv_norm", "qmv_norm.h",
                       ("x", "w", "scales", "biases", "nw"), ("y",))
SPEC_RES = KernelSpec("marlin_qmv_res", "qmv_res.h", ("x", "w", "scales", "biases", "res"), ("y",))
SPEC_GATED_NORM = KernelSpec("marlin_gated_norm", "gated_norm.h",
                             ("x", "w", "scales", "biases", "w2", "scales2", "biases2", "nw"),
                             ("y",))
# The same fusions on the folded tensor-core GEMV (src/qmv_fold.h), for the launches it covers
# (up to qmv.FOLD_MAX_M rows; their run-time row count comes last)
FOLD_SPECS = {
    SPEC_NORM: KernelSpec("marlin_fold_norm", "fold_norm.h", (*SPEC_NORM.inputs, "rows"),
                          ("y",)),
    SPEC_RES: KernelSpec("marlin_fold_res", "fold_res.h", (*SPEC_RES.inputs, "rows"), ("y",)),
    SPEC_GATED_NORM: KernelSpec("marlin_fold_gated_norm", "fold_gated_norm.h",
                                (*SPEC_GATED_NORM.inputs, "rows"), ("y",)),
}
SELF_TEST_TOL = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 1.5e-2}
# MARLIN_MLX_FUSE_DECODE=0 turns these fusions and kernels.qk_rope off (the probes compare both)
ENABLED = os.environ.get("MARLIN_MLX_FUSE_DECODE", "1").strip() != "0"


def eps_bits(eps: float) -> int:
    """eps as the int template constant EPS (its float32 bits; positive, so < 2^31)."""
    return struct.unpack("<i", struct.pack("<f", float(eps)))[0]


_PLANS: dict = {}


def _plan(spec, xdt, sdt, bits, group_size, xshape, N, eps):
    """(spec, plan): the folded body's variant where it covers the launch and is switched on
    (qmv.fold_enabled()), else the float body's."""
    fold = _qmv.fold_enabled()
    key = (spec, xdt, sdt, bits, group_size, xshape, N, eps, fold, _qmv.FOLD_P16)
    plan = _PLANS.get(key)
    if plan is None:
        extra = () if eps is None else (("EPS", eps_bits(eps)),)
        if fold and _qmv.fold_supported(xdt, sdt, bits, group_size, math.prod(xshape[:-1]),
                                        xshape[-1]):
            fspec = FOLD_SPECS[spec]
            plan = (fspec, _qmv.fold_plan(xdt, sdt, group_size, xshape, N, spec=fspec,
                                          extra=extra))
        else:
            plan = (spec, _qmv.build_plan(spec, xdt, sdt, bits, group_size, xshape, N, None,
                                          None, _qmv.PREFETCH, gated=spec is SPEC_GATED_NORM,
                                          extra=extra))
        _PLANS[key] = plan
    return plan


def _run(spec, inputs, x, sdt, bits, group_size, N, eps=None, k=None):
    xshape = x.shape if k is None else (*x.shape[:-1], k)  # k: x's first k values
    spec, plan = _plan(spec, x.dtype, sdt, bits, group_size, xshape, N, eps)
    template, grid, tg, oshape, odt, kern, ktemplate = plan[:7]
    inputs = inputs + list(plan[7:])  # the folded body's row count
    return launch_planned(spec, inputs, template, grid, tg, oshape, odt, kern, ktemplate)[0]


def _sdt(arrays, sdt):
    return [a if a.dtype == sdt else a.astype(sdt) for a in arrays]


def qmv_norm_kernel(x, w, scales, biases, norm_w, eps, group_size, bits, k=None):
    """k: the GEMV and the norm read only the first k values of x's one row."""
    b, = _sdt([biases], scales.dtype)
    return _run(SPEC_NORM, [x, w, scales, b, norm_w], x, scales.dtype, bits, group_size,
                w.shape[0], eps, k)


def qmv_res_kernel(x, w, scales, biases, res, group_size, bits):
    b, = _sdt([biases], scales.dtype)
    return _run(SPEC_RES, [x, w, scales, b, res], x, scales.dtype, bits, group_size, w.shape[0])


def gated_norm_kernel(x, gate, up, norm_w, eps, group_size, bits):
    (w, s, b), (w2, s2, b2) = gate, up
    b, s2, b2 = _sdt([b, s2, b2], s.dtype)
    return _run(SPEC_GATED_NORM, [x, w, s, b, w2, s2, b2, norm_w], x, s.dtype, bits, group_size,
                w.shape[0], eps)


# ------------------------------------------------------------------ references (MLX ops)

def _qmm(x, w, s, b, gs, bits):
    return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=bits)


def qmv_norm_reference(x, w, s, b, norm_w, eps, gs, bits):
    return _qmm(mx.fast.rms_norm(x, norm_w, eps), w, s, b, gs, bits)


def qmv_res_reference(x, w, s, b, res, gs, bits):
    return res + _qmm(x, w, s, b, gs, bits)


def gated_norm_reference(x, gate, up, norm_w, eps, gs, bits):
    n = mx.fast.rms_norm(x, norm_w, eps)
    g = _qmm(n, *gate, gs, bits)
    return g * mx.sigmoid(g) * _qmm(n, *up, gs, bits)


# ------------------------------------------------------------------ what the models call

def _layer_ok(layer, x) -> bool:
    return (type(layer) is _ql.QuantizedLinear and layer.mode == "affine"
            and "bias" not in layer and "biases" in layer and layer["weight"].ndim == 2
            and _qmv.supported(x, layer["weight"], layer["scales"], layer["biases"],
                               layer.group_size, layer.bits))


def _rows_ok(x, layer, k=None) -> bool:
    """One row on either body; up to qmv.FOLD_MAX_M rows (a batched decode step) where the
    folded body covers the launch (it stages each row of x; `k`, a prefix of a longer row,
    stays one row)."""
    if not (ENABLED and backend() is not None and x.ndim >= 1):
        return False
    M = math.prod(x.shape[:-1])
    return M == 1 or (k is None and _qmv.fold_enabled() and _qmv.fold_supported(
        x.dtype, layer["scales"].dtype, layer.bits, layer.group_size, M, x.shape[-1]))


def _rows_class(x) -> int:
    """The timed row count of a launch: 1, or the folded body's row bound (8)."""
    return _qmv.fold_rows_bound(math.prod(x.shape[:-1]))


_DECISIONS: dict = {}


def _decide(op, x, layers, eps=None, k=None) -> bool:
    l0 = layers[0]
    w, sdt = l0["weight"], l0["scales"].dtype
    MR = _rows_class(x)
    key = (op, x.dtype, sdt, w.shape, l0.bits, l0.group_size, eps, selection.mode(),
           _qmv.fold_enabled(), MR)
    use = _DECISIONS.get(key)
    if use is None:  # (N, K): the packed weight's rows, x's length (not the packed words)
        use = _DECISIONS[key] = _measure(op, x.dtype, sdt, (w.shape[0], k or x.shape[-1]),
                                         l0.bits, l0.group_size, eps, MR)
    return use


def _measure(op, xdt, sdt, shape, bits, gs, eps, M=1) -> bool:
    N, K = shape

    def make_inputs():
        ws = [mx.quantize(mx.random.normal((N, K), dtype=sdt), group_size=gs, bits=bits)
              for _ in range(2 if op == "gated_norm" else 1)]
        x = mx.random.normal((M, K)).astype(xdt)
        extra = (mx.random.normal((M, N)).astype(xdt) if op == "qmv_res"
                 else (1.0 + 0.1 * mx.random.normal((K,))).astype(xdt))
        return (x, *[a for t in ws for a in t], extra)

    def f32(a):
        return a.astype(mx.float32)

    if op == "qmv_norm":
        custom = lambda x, w, s, b, nw: qmv_norm_kernel(x, w, s, b, nw, eps, gs, bits)  # noqa: E731
        builtin = lambda x, w, s, b, nw: qmv_norm_reference(x, w, s, b, nw, eps, gs, bits)  # noqa: E731
        reference = lambda x, w, s, b, nw: reference_matmul(  # noqa: E731
            mx.fast.rms_norm(f32(x), f32(nw), eps), w, s, b, "affine", bits, gs)
    elif op == "qmv_res":
        custom = lambda x, w, s, b, r: qmv_res_kernel(x, w, s, b, r, gs, bits)  # noqa: E731
        builtin = lambda x, w, s, b, r: qmv_res_reference(x, w, s, b, r, gs, bits)  # noqa: E731
        reference = lambda x, w, s, b, r: f32(r) + reference_matmul(  # noqa: E731
            x, w, s, b, "affine", bits, gs)
    else:
        def custom(x, w, s, b, w2, s2, b2, nw):
            return gated_norm_kernel(x, (w, s, b), (w2, s2, b2), nw, eps, gs, bits)

        def builtin(x, w, s, b, w2, s2, b2, nw):
            return gated_norm_reference(x, (w, s, b), (w2, s2, b2), nw, eps, gs, bits)

        def reference(x, w, s, b, w2, s2, b2, nw):
            n = mx.fast.rms_norm(f32(x), f32(nw), eps)
            g = reference_matmul(n, w, s, b, "affine", bits, gs)
            return g * mx.sigmoid(g) * reference_matmul(n, w2, s2, b2, "affine", bits, gs)

    fmt = f"affine-b{bits}-g{gs}" + _qmv.body_tag(xdt, sdt, bits, gs, M, K)
    rows = "M1" if M == 1 else f"M2-{M}"  # the rows the folded launch is bound to
    cls = f"{rows}|{xdt}|{sdt}|K{K}|N{N}" + ("" if eps is None else f"|eps{eps:g}")
    return selection.use_custom(op, fmt, cls, make_inputs, custom, builtin, reference,
                                SELF_TEST_TOL.get(xdt, 1e-2), margin=selection.FUSION_MARGIN)


def norm_linear(x, norm_w, eps: float, layer, prefix: bool = False):
    """layer(rms_norm(x, norm_w, eps)) in one launch, or None (then run the two ops).

    prefix: x's row is longer than the layer's input (a fused projection's output) and its
    first part is the input: the kernel reads it in place, no slice."""
    k = layer["weight"].shape[-1] * 32 // layer.bits if prefix else None
    if not (norm_w.dtype == x.dtype and _layer_ok(layer, x) and _rows_ok(x, layer, k)
            and (k or x.shape[-1]) == norm_w.shape[-1]
            and _decide("qmv_norm", x, [layer], float(eps), k)):
        return None
    return qmv_norm_kernel(x, layer["weight"], layer["scales"], layer["biases"], norm_w, eps,
                           layer.group_size, layer.bits, k)


def linear_residual(x, layer, res):
    """res + layer(x) in one launch, or None (then run the two ops)."""
    if not (res.dtype == x.dtype and _layer_ok(layer, x) and _rows_ok(x, layer)
            and res.shape == (*x.shape[:-1], layer["weight"].shape[0])
            and _decide("qmv_res", x, [layer])):
        return None
    return qmv_res_kernel(x, layer["weight"], layer["scales"], layer["biases"], res,
                          layer.group_size, layer.bits)


def norm_swiglu(x, norm_w, eps: float, gate, up):
    """silu(gate(n)) * up(n), n = rms_norm(x, norm_w, eps), in one launch, or None."""
    if not (_ql.FUSE_GATE_UP and norm_w.dtype == x.dtype and _layer_ok(gate, x)
            and _layer_ok(up, x) and _rows_ok(x, gate)
            and (gate.bits, gate.group_size) == (up.bits, up.group_size)
            and gate["weight"].shape == up["weight"].shape
            and gate["scales"].dtype == up["scales"].dtype
            and _decide("gated_norm", x, [gate, up], float(eps))):
        return None
    return gated_norm_kernel(x, (gate["weight"], gate["scales"], gate["biases"]),
                             (up["weight"], up["scales"], up["biases"]), norm_w, eps,
                             gate.group_size, gate.bits)


def compile_cases():
    """(id, spec, input dtypes, input sizes, output dtypes, template) for the compile checks."""
    F16, BF16, U32 = mx.float16, mx.bfloat16, mx.uint32

    def dtypes(spec, dt):
        return [dt if n in ("x", "scales", "biases", "scales2", "biases2", "nw", "res")
                else (mx.int32 if n == "rows" else U32) for n in spec.inputs]

    out = []
    for dt in (F16, BF16, mx.float32):
        for spec in (SPEC_NORM, SPEC_RES, SPEC_GATED_NORM):
            eps = None if spec is SPEC_RES else 1e-6
            extra = () if eps is None else (("EPS", eps_bits(eps)),)
            t = _qmv.build_plan(spec, dt, dt, 4, 64, (1, 4096), 12288, None, None, 0,
                                gated=spec is SPEC_GATED_NORM, extra=extra)[0]
            out.append((f"{spec.name}-{dt}".replace("mlx.core.", ""), spec, dtypes(spec, dt),
                        [1 << 20] * len(spec.inputs), [dt], t))
            if dt != mx.float32:  # the folded body's variant of the same launch, 1 and 6 rows
                fspec = FOLD_SPECS[spec]
                for MT in (1, 6):
                    t = _qmv.fold_plan(dt, dt, 64, (MT, 4096), 12288, spec=fspec, extra=extra)[0]
                    out.append((f"{fspec.name}-{dt}-M{MT}".replace("mlx.core.", ""), fspec,
                                dtypes(fspec, dt), [1 << 20] * (len(fspec.inputs) - 1) + [8],
                                [dt], t))
    return out
