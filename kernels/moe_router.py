"""moe_router: router logits -> top-k expert indices and routing weights, fused for a GPU.

`route(logits, top_k, ...)` is the op (Qwen3-MoE: softmax top-k, optionally renormalized;
GLM-4.7-Flash / DeepSeek: sigmoid scores, a selection-only bias, group-limited selection,
renormalized and scaled weights). Body: `src/moe_router.h`, one simdgroup per token. The
reference, `route_reference`, is plain MLX (the CPU path and the GPU oracle).

Tie rule (both paths): experts come out in descending order of their choice score, equal
scores ordered by the lower expert index; groups likewise. For softmax scoring the choice
score is the logit itself (softmax is monotonic; its rounding could only create ties).
"""

from __future__ import annotations

import math
import struct

import mlx.core as mx

from . import selection
from .launch import KernelSpec, backend, launch
from .qmv import XKIND

SPEC = KernelSpec("marlin_moe_router", "moe_router.h", ("logits", "bias"), ("inds", "weights"))
NORM_SPEC = KernelSpec("marlin_moe_route_norm", "moe_route_norm.h", ("h", "nw", "gw", "bias"),
                       ("xn", "inds", "weights"))
# threads per token: 32 simdgroups on CUDA put more of the router weight in flight (512 took
# 14 us a launch on the H200); Metal keeps 512, within every pipeline's thread limit
NORM_THREADS = {"cuda": 1024, "metal": 512}
NORM_MAX_TOKENS = 8    # one threadgroup per token, each reading the whole router weight
NORM_MAX_DIMS = 6144   # the normed input sits in threadgroup memory (float32)

SCORING_FUNCS = ("softmax", "sigmoid")
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
MAX_EXPERTS = 32 * 16  # 16 experts per lane in registers
TOL = 1e-5  # self-test: weights and (exactly equal) indices, relative


def validate(logits, top_k, scoring, correction_bias, n_group, topk_group):
    """One-line ValueErrors for arguments the router cannot honour."""
    if scoring not in SCORING_FUNCS:
        raise ValueError(f"scoring {scoring!r} is not supported (supported: {', '.join(SCORING_FUNCS)})")
    if logits.ndim < 1:
        raise ValueError("router logits must have an experts axis")
    E = logits.shape[-1]
    if not 0 < top_k <= E:
        raise ValueError(f"top_k {top_k} must be in 1..{E} (the number of experts)")
    if correction_bias is not None and correction_bias.shape != (E,):
        raise ValueError(f"correction bias has shape {tuple(correction_bias.shape)}, expected ({E},)")
    if n_group > 1 and topk_group < n_group:
        if E % n_group:
            raise ValueError(f"{E} experts do not split into n_group={n_group} equal groups")
        if not 0 < topk_group:
            raise ValueError(f"topk_group {topk_group} must be at least 1")
        if top_k > topk_group * (E // n_group):
            raise ValueError(f"top_k {top_k} exceeds the {topk_group * (E // n_group)} experts "
                             f"of topk_group={topk_group} groups")


def _argmax_rounds(choice, n):
    """n indices of the largest values along the last axis, in descending order, ties to the
    lower index (MLX's argmax returns the first maximum)."""
    out = []
    for _ in range(n):
        i = mx.argmax(choice, axis=-1, keepdims=True)
        out.append(i)
        choice = mx.put_along_axis(choice, i, mx.array(-math.inf, mx.float32), axis=-1)
    return mx.concatenate(out, axis=-1)


def route_reference(logits, top_k: int, *, scoring: str = "softmax", norm_topk_prob: bool = False,
                    correction_bias=None, n_group: int = 1, topk_group: int = 1,
                    routed_scaling_factor: float = 1.0):
    """Plain MLX: (indices (..., top_k) uint32, weights (..., top_k) float32); see the module
    docstring for the order and tie rule. Computed in float32 whatever the input dtype."""
    logits = logits.astype(mx.float32)
    if scoring == "softmax":
        scores = mx.softmax(logits, axis=-1, precise=True)
        choice = logits
    else:
        scores = mx.sigmoid(logits)
        choice = scores
    if correction_bias is not None:
        choice = scores + correction_bias.astype(mx.float32)
    E = logits.shape[-1]
    if n_group > 1 and topk_group < n_group:
        grouped = choice.reshape(*choice.shape[:-1], n_group, E // n_group)
        best = min(2, E // n_group)
        group_scores = mx.topk(grouped, best, axis=-1).sum(axis=-1)  # (..., n_group)
        kept = _argmax_rounds(group_scores, topk_group)
        keep = mx.put_along_axis(mx.zeros(group_scores.shape, mx.bool_), kept,
                                 mx.array(True), axis=-1)
        grouped = mx.where(keep[..., None], grouped, mx.array(-math.inf, mx.float32))
        choice = grouped.reshape(choice.shape)
    inds = _argmax_rounds(choice, top_k)
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return inds.astype(mx.uint32), weights


def _f32_bits(v: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(v)))[0]


def template_for(dtype, E, top_k, scoring, has_bias, n_group, topk_group, norm, rsf):
    return [("T", dtype), ("E", E), ("TOPK", top_k), ("SOFTMAX", scoring == "softmax"),
            ("HAS_BIAS", bool(has_bias)), ("NGRP", n_group), ("TOPKG", topk_group),
            ("NORM", bool(norm)), ("RSF", _f32_bits(rsf))]


def supported(logits, n_group, routed_scaling_factor=1.0) -> bool:
    # the scaling factor travels as its float32 bits in an int template constant: >= 0 only
    return (logits.dtype in DTYPES and logits.shape[-1] <= MAX_EXPERTS and n_group <= 32
            and routed_scaling_factor >= 0)


def route_kernel(logits, top_k: int, *, scoring: str = "softmax", norm_topk_prob: bool = False,
                 correction_bias=None, n_group: int = 1, topk_group: int = 1,
                 routed_scaling_factor: float = 1.0):
    """The custom kernel alone (no validation, no fallback)."""
    template = template_for(logits.dtype, logits.shape[-1], top_k, scoring,
                            correction_bias is not None, n_group, topk_group, norm_topk_prob,
                            routed_scaling_factor)
    return _launch(logits, top_k, correction_bias, template)


_ZEROS: dict = {}


def _launch(logits, top_k, correction_bias, template):
    lead, E = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, E)
    n = x.shape[0]
    if correction_bias is None:
        bias = _ZEROS.get(E)
        if bias is None:
            bias = _ZEROS[E] = mx.zeros((E,), mx.float32)
    else:
        bias = correction_bias if correction_bias.dtype == mx.float32 else correction_bias.astype(mx.float32)
    inds, w = launch(SPEC, [x, bias], template, grid=(32, n, 1), threadgroup=(32, 1, 1),
                     output_shapes=[(n, top_k), (n, top_k)], output_dtypes=[mx.uint32, mx.float32])
    return inds.reshape(*lead, top_k), w.reshape(*lead, top_k)


def _packed(fn, kw):
    def run(logits, bias):
        i, w = fn(logits, kw["top_k"], correction_bias=bias if kw["has_bias"] else None,
                  **{k: v for k, v in kw.items() if k not in ("top_k", "has_bias")})
        return mx.concatenate([i.astype(mx.float32), w], axis=-1)
    return run


def route(logits, top_k: int, *, scoring: str = "softmax", norm_topk_prob: bool = False,
          correction_bias=None, n_group: int = 1, topk_group: int = 1,
          routed_scaling_factor: float = 1.0):
    """Router logits (..., E) -> (expert indices (..., top_k) uint32, weights (..., top_k)
    float32): the custom kernel on a GPU where it passed its self-test, else the reference."""
    # the checks and the selection's answer are memoized: this runs per layer per token
    key = (logits.shape[-1:], logits.dtype, top_k, scoring, norm_topk_prob,
           None if correction_bias is None else correction_bias.shape, n_group, topk_group,
           routed_scaling_factor, backend(), selection.mode())
    template = _PLANS.get(key, _MISS)
    if template is _MISS:
        validate(logits, top_k, scoring, correction_bias, n_group, topk_group)
        kw = dict(scoring=scoring, norm_topk_prob=norm_topk_prob, n_group=n_group,
                  topk_group=topk_group, routed_scaling_factor=routed_scaling_factor)
        template = None
        if (key[-2] is not None and supported(logits, n_group, routed_scaling_factor)
                and _decide(logits, top_k, correction_bias is not None, kw)):
            template = template_for(logits.dtype, logits.shape[-1], top_k, scoring,
                                    correction_bias is not None, n_group, topk_group,
                                    norm_topk_prob, routed_scaling_factor)
        _PLANS[key] = template
    if template is None or logits.size == 0:
        return route_reference(logits, top_k, scoring=scoring, norm_topk_prob=norm_topk_prob,
                               correction_bias=correction_bias, n_group=n_group,
                               topk_group=topk_group, routed_scaling_factor=routed_scaling_factor)
    return _launch(logits, top_k, correction_bias, template)


_MISS = object()
_PLANS: dict = {}  # memo: arguments -> kernel template, or None for the reference


def _decide(logits, top_k, has_bias, kw) -> bool:
    E = logits.shape[-1]
    cls = (f"E{E}-k{top_k}-{logits.dtype}-bias{int(has_bias)}-g{kw['n_group']}/{kw['topk_group']}"
           f"-norm{int(kw['norm_topk_prob'])}").replace("mlx.core.", "")

    def make_inputs():
        x = mx.random.normal((64, E)).astype(logits.dtype)
        return x, mx.random.normal((E,)) * 0.1

    full = dict(kw, top_k=top_k, has_bias=has_bias)
    ref = _packed(route_reference, full)
    return selection.use_custom("moe_router", kw["scoring"], cls, make_inputs,
                                _packed(route_kernel, full), ref, ref, TOL)


def compile_cases():
    """Metal/CUDA compile checks (tests/test_metal_compile.py): Qwen3-30B-A3B's and
    GLM-4.7-Flash's routers, DeepSeek-style grouping, a tiny expert count."""
    F32, BF16, U32 = mx.float32, mx.bfloat16, mx.uint32
    out = []
    for name, dt, E, k, scoring, bias, ng, tg, norm, rsf in (
            ("qwen3-30b", BF16, 128, 8, "softmax", False, 1, 1, True, 1.0),
            ("glm-4.7-flash", F32, 64, 4, "sigmoid", True, 1, 1, True, 1.8),
            ("grouped", F32, 256, 8, "sigmoid", True, 8, 4, True, 2.5),
            ("tiny", mx.float16, 6, 2, "softmax", False, 1, 1, False, 1.0)):
        t = template_for(dt, E, k, scoring, bias, ng, tg, norm, rsf)
        out.append((f"moe-router-{name}", SPEC, [dt, F32], [E, E], [U32, F32], t))
    return out + norm_compile_cases()


# ------------------------------------------------------------------ norm + router GEMV + route

def norm_route_reference(h, norm_w, eps, gate_w, top_k, **kw):
    """The MLX ops a MoE layer runs at its input: (xn = rms_norm(h), indices, weights), the
    router logits in float32 from xn (as transformers computes them)."""
    xn = mx.fast.rms_norm(h, norm_w, eps)
    logits = xn.astype(mx.float32) @ gate_w.astype(mx.float32).T
    return (xn, *route(logits, top_k, **kw))


def norm_route_kernel(h, norm_w, eps, gate_w, top_k, *, correction_bias=None,
                      scoring="sigmoid", norm_topk_prob=False, n_group=1, topk_group=1,
                      routed_scaling_factor=1.0):
    """The one launch (no validation, no fallback): h (..., D) of n rows -> (xn (n, D), inds
    (n, k), weights (n, k)). The kernel reads h as rows, so its leading dims go in as they are:
    a reshape is a graph node, and a compiled decode step replays every node on every token."""
    D = h.shape[-1]
    n = h.size // D
    E = gate_w.shape[0]
    nth = NORM_THREADS.get(backend(), 512)
    template = [("GT", gate_w.dtype), ("XK", XKIND[h.dtype]), ("D", D),
                ("NTH", nth), ("EPS", _f32_bits(eps))] + template_for(
        h.dtype, E, top_k, scoring, correction_bias is not None, n_group, topk_group,
        norm_topk_prob, routed_scaling_factor)
    if correction_bias is None:
        bias = _ZEROS.get(E)
        if bias is None:
            bias = _ZEROS[E] = mx.zeros((E,), mx.float32)
    else:
        bias = correction_bias if correction_bias.dtype == mx.float32 else \
            correction_bias.astype(mx.float32)
    return tuple(launch(NORM_SPEC, [h, norm_w, gate_w, bias], template,
                        grid=(nth, n, 1), threadgroup=(nth, 1, 1),
                        output_shapes=[(n, D), (n, top_k), (n, top_k)],
                        output_dtypes=[h.dtype, mx.uint32, mx.float32]))


_NORM_PLANS: dict = {}


def norm_route(h, norm_w, eps, gate_w, top_k: int, *, correction_bias=None,
               scoring: str = "sigmoid", norm_topk_prob: bool = False, n_group: int = 1,
               topk_group: int = 1, routed_scaling_factor: float = 1.0, flat: bool = False):
    """A MoE layer's input RMSNorm, float32 router GEMV and routing for a few tokens h (..., D)
    as one launch on a GPU: (xn (..., D) in h's dtype, indices, weights), or with `flat` the
    n rows as (n, D), (n, k), (n, k) (no reshape nodes); None where the kernel does not
    apply or lost its first-use measurement (the caller runs the MLX ops)."""
    from . import fused_linear  # the decode fusions' on/off switch
    lead, D = h.shape[:-1], h.shape[-1]
    n = h.size // D if D else 0
    if not (fused_linear.ENABLED and backend() is not None and 0 < n <= NORM_MAX_TOKENS):
        return None
    E = gate_w.shape[0]
    key = (h.dtype, norm_w.dtype, gate_w.dtype, gate_w.shape, top_k, float(eps), scoring,
           norm_topk_prob, None if correction_bias is None else correction_bias.shape,
           n_group, topk_group, routed_scaling_factor, selection.mode())
    use = _NORM_PLANS.get(key)
    if use is None:
        use = (h.dtype in DTYPES and norm_w.dtype == h.dtype and norm_w.shape == (D,)
               and gate_w.dtype in (mx.float32, h.dtype) and gate_w.shape == (E, D)
               and D % 4 == 0 and D <= NORM_MAX_DIMS and E <= MAX_EXPERTS and n_group <= 32
               and routed_scaling_factor >= 0)
        if use:
            validate(mx.zeros((1, E)), top_k, scoring, correction_bias, n_group, topk_group)
        kw = dict(correction_bias=correction_bias, scoring=scoring,
                  norm_topk_prob=norm_topk_prob, n_group=n_group, topk_group=topk_group,
                  routed_scaling_factor=routed_scaling_factor)
        use = _NORM_PLANS[key] = use and _decide_norm(h.dtype, norm_w, eps, gate_w, top_k, kw)
    if not use:
        return None
    xn, inds, w = norm_route_kernel(h, norm_w, eps, gate_w, top_k,
                                    correction_bias=correction_bias, scoring=scoring,
                                    norm_topk_prob=norm_topk_prob, n_group=n_group,
                                    topk_group=topk_group,
                                    routed_scaling_factor=routed_scaling_factor)
    if flat:
        return xn, inds, w
    return xn.reshape(*lead, D), inds.reshape(*lead, top_k), w.reshape(*lead, top_k)


def _decide_norm(dtype, norm_w, eps, gate_w, top_k, kw) -> bool:
    E, D = gate_w.shape
    cls = (f"E{E}-D{D}-k{top_k}-{dtype}-w{gate_w.dtype}-bias{int(kw['correction_bias'] is not None)}"
           f"-g{kw['n_group']}/{kw['topk_group']}").replace("mlx.core.", "")
    bias = kw["correction_bias"]

    def make_inputs():
        h = (mx.random.normal((NORM_MAX_TOKENS, D)) * 3).astype(dtype)
        nw = (1 + 0.1 * mx.random.normal((D,))).astype(dtype)
        gw = (mx.random.normal((E, D)) * D ** -0.5).astype(gate_w.dtype)
        b = None if bias is None else (mx.random.normal((E,)) * 0.1).astype(bias.dtype)
        return (h, nw, gw) if b is None else (h, nw, gw, b)

    def packed(fn):
        def run(h, nw, gw, b=None):
            xn, i, w = fn(h, nw, eps, gw, top_k, **dict(kw, correction_bias=b))
            return mx.concatenate([xn.astype(mx.float32).reshape(-1), w.reshape(-1),
                                   i.astype(mx.float32).reshape(-1)])
        return run

    tol = 1e-5 if dtype == mx.float32 else 1e-2
    ref = packed(norm_route_reference)
    return selection.use_custom("moe_route_norm", kw["scoring"], cls, make_inputs,
                                packed(norm_route_kernel), ref, ref, tol,
                                margin=selection.FUSION_MARGIN)


def norm_compile_cases():
    """GLM-4.7-Flash's MoE input (bf16 activations, float32 router weight) and a float16 one
    with a 16-bit router weight and grouped selection."""
    F32, U32 = mx.float32, mx.uint32
    out = []
    for name, dt, gdt, D, E, k, ng, tg, rsf in (
            ("glm-4.7-flash", mx.bfloat16, F32, 2048, 64, 4, 1, 1, 1.8),
            ("f16-grouped", mx.float16, mx.float16, 1024, 256, 8, 8, 4, 2.5)):
        t = [("GT", gdt), ("XK", XKIND[dt]), ("D", D), ("NTH", NORM_THREADS["cuda"]),
             ("EPS", _f32_bits(1e-5))] + template_for(dt, E, k, "sigmoid", True, ng, tg, True, rsf)
        out.append((f"moe-route-norm-{name}", NORM_SPEC, [dt, dt, gdt, F32],
                    [1 << 16, D, E * D, E], [dt, U32, F32], t))
    return out
