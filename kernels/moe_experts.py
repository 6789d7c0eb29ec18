"""moe_experts: the routed SwiGLU experts of a MoE layer over quantized stacked weights.

y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = inds[t, j], with the
experts stacked (E, out, in) in MLX's affine layout (`QuantizedSwitchLinear`, mlx-lm's).

For few tokens (decode) the custom path is two launches that read only the selected experts'
rows: `src/moe_gate_up.h` (gate + up + SiLU·mul, times the routing weight, one pass over both
weights) and `src/moe_down.h` (down projection and weighted combine over the top-k experts);
the `_shared` variants add an always-active shared expert (GLM) as one more slot of the same
two launches, where that measures faster than running it beside them.
The reference is MLX's `gather_qmm` (the CPU path, the built-in GPU path and the GPU tests'
fast twin), with the (token, expert) pairs sorted by expert for many tokens:
`switch_glu_reference(..., sort=True)`.

Many tokens (prefill, n > MAX_TOKENS): MLX's `gather_qmm` runs ~30 ms per GLM-4.7-Flash layer
at 2048 tokens on an H200, 60-100x the time of its 155 GFLOP on tensor cores. The prefill
variants (`switch_glu_prefill`, chosen by $MARLIN_MLX_MOE_PREFILL, default `quant_blocks`,
against `gather_qmm` through the measured selection) run tensor-core products, most of them on
experts dequantized to the activation dtype (kernels/dequantize.py, one launch per stack):
- `dequant_gather_mm`: all experts dequantized (a transient 3 * E * I * D values), then
  `mx.gather_mm` over the pairs sorted by expert (CUDA: one grouped GEMM per projection);
- `dequant_used`: the same over only the experts that received tokens (one host sync);
- `dequant_padded_bmm`: one host sync for the counts, each used expert's rows padded to the
  largest count, then one batched matmul per projection (cuBLAS, aligned) over (E', C, D);
- `per_expert`: one host sync for the per-expert counts, then per expert with tokens a
  dequantize + dense matmul over its contiguous rows;
- `per_expert_qmm`: the same with `mx.quantized_matmul` per expert (no dequantize);
- `quant_blocks` (the default): the blocks of `dequant_blocks` (64 rows), multiplied by
  kernels/block_qmm.py on the quantized experts: two launches (gate + up + SwiGLU, down), no
  dense weights, spare blocks skipped. GLM-4.7-Flash experts at 2048 tokens: 1108 µs a layer
  against 1674 for dequantize + gather_mm (benchmarks/results/block_qmm_h200.json). Activations
  of other dtypes than float16/bfloat16 take `dequant_blocks`;
- `dequant_blocks`: no host sync: the sorted rows go into blocks of BLOCK_ROWS,
  each expert's from a new block (zero rows pad it), then `mx.gather_mm` with one expert per
  block (CUDA: MLX's tiled gather GEMM over BLOCK_ROWS-row batches). The block count has a
  static bound, ceil(pairs / BLOCK_ROWS) + E. GLM-4.7-Flash prefill at 2048 tokens: 280 ms
  against 304 for `dequant_gather_mm`, whose grouped GEMM took twice as long
  (benchmarks/results/prefill_probe_glm_s10_h200.json);
- `gather_qmm`: the reference (never the custom path).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import block_qmm, selection
from . import dequantize as _dq
from .gather_rows import gather_rows
from .launch import KernelSpec, backend, cdiv, launch
from .qmv import TARGET_WARPS, XKIND

GATE_UP = KernelSpec("marlin_moe_gate_up", "moe_gate_up.h",
                     ("x", "inds", "wts", "w", "scales", "biases", "w2", "scales2", "biases2"), ("y",))
DOWN = KernelSpec("marlin_moe_down", "moe_down.h", ("x", "inds", "w", "scales", "biases"), ("y",))
# the same with an always-active shared expert as one more slot (its own 2-D weights)
GATE_UP_SHARED = KernelSpec(
    "marlin_moe_gate_up_shared", "moe_gate_up_shared.h",
    GATE_UP.inputs + ("sw", "sscales", "sbiases", "sw2", "sscales2", "sbiases2"), ("y",))
DOWN_SHARED = KernelSpec("marlin_moe_down_shared", "moe_down_shared.h",
                         DOWN.inputs + ("sw", "sscales", "sbiases"), ("y",))
# and with the layer's residual add in its output write
DOWN_SHARED_RES = KernelSpec("marlin_moe_down_shared_res", "moe_down_shared_res.h",
                             DOWN_SHARED.inputs + ("res",), ("y",))

BITS = (2, 3, 4, 5, 6, 8)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
MAX_TOKENS = 8  # at most this many tokens take the fused path (one threadgroup row per token)
TOL = {mx.float32: 1e-4, mx.float16: 5e-3, mx.bfloat16: 2e-2}  # self-test vs the float32 oracle


def switch_glu_reference(x, inds, weights, gate, up, down, group_size: int = 64, bits: int = 4,
                         sort: bool = False):
    """x (n, D), inds/weights (n, k); gate/up/down: (w, scales, biases) stacked triples.
    MLX's gather_qmm, optionally with the (token, expert) pairs sorted by expert."""
    n, D = x.shape
    k = inds.shape[-1]
    q = dict(transpose=True, group_size=group_size, bits=bits, sorted_indices=sort)
    if sort:
        flat = inds.flatten()
        order = mx.argsort(flat)
        h, idx = x.reshape(n, 1, D)[order // k], flat[order]
    else:
        h, idx = x.reshape(n, 1, 1, D), inds
    g = mx.gather_qmm(h, *gate, rhs_indices=idx, **q)
    u = mx.gather_qmm(h, *up, rhs_indices=idx, **q)
    y = mx.gather_qmm(nn.silu(g) * u, *down, rhs_indices=idx, **q)
    if sort:
        y = y[mx.argsort(order)]
    y = y.reshape(n, k, D)
    return (y * weights.reshape(n, k, 1).astype(y.dtype)).sum(axis=1).astype(x.dtype)


def config(rows: int, N: int, steps: int, gated: bool, R=None, SK=None):
    """(R, SK): R rows per simdgroup (gated: R gate + R up rows), SK simdgroups splitting the
    reduction, enough simdgroups in flight for the GPU (rows = threadgroup rows of the grid)."""
    if R is None:
        R = 2 if gated else 4
    if SK is None:
        SK = max(1, min(8, cdiv(steps, 32), cdiv(TARGET_WARPS, cdiv(N, R) * rows)))
    return R, max(1, min(SK, 32))


def _template(T, S, O, bits, gs, R, SK, k, E, K, N):
    return [("T", T), ("XK", XKIND[T]), ("S", S), ("O", O), ("BITS", bits), ("GS", gs),
            ("R", R), ("SK", SK), ("TOPK", k), ("NE", E), ("K", K), ("N", N)]


def _same_dtype(triples, dtype):
    out = []
    for w, sc, b in triples:
        out += [w, sc if sc.dtype == dtype else sc.astype(dtype), b if b.dtype == dtype else b.astype(dtype)]
    return out


_PLANS: dict = {}  # launch plans, memoized: built per layer per token at decode


def _plan(gated, n, k, E, N, K, xdt, sdt, odt, bits, gs, shared, R, SK, res=False):
    key = (gated, n, k, E, N, K, xdt, sdt, odt, bits, gs, shared, R, SK, res)
    plan = _PLANS.get(key)
    if plan is None:
        slots = k + shared
        rows = n * slots if gated else n
        R, SK = config(rows, N, (1 if gated else slots) * K // 32, gated, R, SK)
        spec = (GATE_UP_SHARED if shared else GATE_UP) if gated else (
            (DOWN_SHARED_RES if res else DOWN_SHARED) if shared else DOWN)
        plan = _PLANS[key] = (spec, _template(xdt, sdt, odt, bits, gs, R, SK, k, E, K, N),
                              (32 * SK * cdiv(N, R), rows, 1), (32 * SK, 1, 1), [(rows, N)], [odt])
    return plan


def gate_up_kernel(x, inds, wts, gate, up, group_size, bits, *, shared=None, R=None, SK=None):
    """x (n, D), inds (n, k) uint32, wts (n, k) float32 -> h (n * slots, I) float32:
    wts * silu(x Wg[e]^T) * (x Wu[e]^T) per (token, slot) pair; with `shared` (its gate and
    up triples, 2-D) the shared expert is slot k of every token, weight 1."""
    n, D = x.shape
    E, N = gate[0].shape[:2]
    sdt = gate[1].dtype
    spec, t, grid, tg, oshape, odt = _plan(True, n, inds.shape[-1], E, N, D, x.dtype, sdt,
                                           mx.float32, bits, group_size, shared is not None, R, SK)
    ins = [x, inds, wts, *_same_dtype((gate, up), sdt)]
    if shared is not None:
        ins += _same_dtype(shared, sdt)
    return launch(spec, ins, t, grid, tg, oshape, odt)[0]


def down_kernel(h, inds, down, group_size, bits, out_dtype, *, shared=None, R=None, SK=None,
                residual=None):
    """h (n * slots, I) float32 (routing weights applied), inds (n, k) -> y (n, D) in
    out_dtype: the sum over a token's slots of h Wd^T (`shared`: the shared expert's down
    triple, slot k; `residual`: n * D values in out_dtype, with `shared` only: added to y,
    which then takes the residual's shape: no reshape node on a compiled decode step)."""
    n, k = inds.shape
    E, N = down[0].shape[:2]
    sdt = down[1].dtype
    res = residual is not None
    spec, t, grid, tg, oshape, odt = _plan(False, n, k, E, N, h.shape[-1], mx.float32, sdt,
                                           out_dtype, bits, group_size, shared is not None, R, SK,
                                           res)
    ins = [h, inds, *_same_dtype((down,), sdt)]
    if shared is not None:
        ins += _same_dtype((shared,), sdt)
    if res:
        ins.append(residual)
        oshape = [residual.shape]
    return launch(spec, ins, t, grid, tg, oshape, odt)[0]


def switch_glu_kernel(x, inds, weights, gate, up, down, group_size, bits, *, shared=None,
                      cfg=None, residual=None):
    """The two custom launches (no validation, no fallback). shared: (gate, up, down) triples
    of a shared expert (2-D, same format and sizes) folded in as one more slot; residual
    (n, D) in x's dtype, with `shared` only: added by the down launch; cfg:
    ((R, SK), (R, SK)) overrides."""
    (r1, s1), (r2, s2) = cfg or ((None, None), (None, None))
    if inds.dtype != mx.uint32:
        inds = inds.astype(mx.uint32)
    if weights.dtype != mx.float32:
        weights = weights.astype(mx.float32)
    h = gate_up_kernel(x, inds, weights, gate, up, group_size, bits,
                       shared=None if shared is None else shared[:2], R=r1, SK=s1)
    return down_kernel(h, inds, down, group_size, bits, x.dtype,
                       shared=None if shared is None else shared[2], R=r2, SK=s2,
                       residual=residual)


def validate(x, inds, weights, gate, up, down, group_size, bits):
    """One-line ValueErrors for inconsistent shapes (the stacked triples against x and inds)."""
    if x.ndim != 2 or inds.ndim != 2 or weights.shape != inds.shape or inds.shape[0] != x.shape[0]:
        raise ValueError(f"expected x (n, D) with inds and weights (n, k); got {tuple(x.shape)}, "
                         f"{tuple(inds.shape)}, {tuple(weights.shape)}")
    D = x.shape[-1]
    for name, (w, s, b) in (("gate", gate), ("up", up), ("down", down)):
        if w.ndim != 3 or w.dtype != mx.uint32:
            raise ValueError(f"{name}: expected stacked uint32 weights (E, N, K*bits/32), got "
                             f"{w.dtype} {tuple(w.shape)}")
        K = w.shape[-1] * 32 // bits
        if s.shape != (*w.shape[:2], K // group_size) or (b is not None and b.shape != s.shape):
            raise ValueError(f"{name}: scales/biases {tuple(s.shape)} do not match weights "
                             f"{tuple(w.shape)} at {bits} bits, group size {group_size}")
    I = gate[0].shape[1]
    if gate[0].shape[-1] * 32 // bits != D or up[0].shape != gate[0].shape:
        raise ValueError(f"gate/up weights {tuple(gate[0].shape)}/{tuple(up[0].shape)} do not take "
                         f"inputs of size {D}")
    if down[0].shape[1] != D or down[0].shape[-1] * 32 // bits != I:
        raise ValueError(f"down weights {tuple(down[0].shape)} do not map {I} back to {D}")


def supported(x, gate, up, down, group_size, bits) -> bool:
    return (bits in BITS and group_size % 32 == 0 and x.dtype in DTYPES
            and x.shape[0] <= MAX_TOKENS and all(t[2] is not None for t in (gate, up, down))
            and all(t[1].dtype in DTYPES for t in (gate, up, down)))


def shared_fits(gate, up, down, shared) -> bool:
    """Whether a shared expert's (gate, up, down) triples (2-D, same format) can be a slot of
    the fused launches: the same sizes as one routed expert, biases present."""
    return (shared is not None and all(t[2] is not None for t in shared)
            and shared[0][0].shape == gate[0].shape[1:] and shared[1][0].shape == up[0].shape[1:]
            and shared[2][0].shape == down[0].shape[1:]
            and all(t[1].shape == r[1].shape[1:] for t, r in zip(shared, (gate, up, down))))


def switch_glu(x, inds, weights, gate, up, down, group_size: int = 64, bits: int = 4,
               *, shared=None, shared_fn=None, residual=None, validate_inputs: bool = True):
    """The routed experts for x (n, D) (+ a shared expert): the custom launches on a GPU for
    n <= MAX_TOKENS where they passed their self-test and measured faster, else MLX's
    gather_qmm (sorted by expert for many tokens).

    shared_fn(x) -> (n, D): an always-active shared expert, added to the result; `shared`, its
    (gate, up, down) quantized triples, lets the custom path fold it into the same two
    launches where that measures faster than running shared_fn beside them. residual (n * D
    values in any shape): added to the result (by the down launch on the fused shared-expert
    path, whose result then has the residual's shape; elsewhere the result is (n, D))."""
    if validate_inputs:
        validate(x, inds, weights, gate, up, down, group_size, bits)
        if residual is not None and residual.size != x.size:
            # the down launch reads n * D residual values, whatever their shape
            raise ValueError(f"residual {tuple(residual.shape)} does not hold the {x.shape[0]} "
                             f"rows of {x.shape[1]} values of x")
    # the path is memoized per shape: this runs per layer per token
    key = (x.shape, x.dtype, inds.shape, gate[0].shape, gate[1].dtype, up[1].dtype, down[1].dtype,
           group_size, bits, shared_fn is None, backend(), selection.mode(), prefill_variant(),
           None if shared is None else tuple((t[0].shape, t[1].shape, t[1].dtype) for t in shared))
    path = _PATHS.get(key)
    if path is None:
        path = _PATHS[key] = _choose(x, inds, gate, up, down, group_size, bits, shared, shared_fn)
    if path == "fused-shared":
        res = residual if residual is not None and residual.dtype == x.dtype else None
        y = switch_glu_kernel(x, inds, weights, gate, up, down, group_size, bits, shared=shared,
                              residual=res)
        return y if residual is None or res is not None else residual.reshape(y.shape) + y
    if path == "kernel":
        y = switch_glu_kernel(x, inds, weights, gate, up, down, group_size, bits)
    elif path.startswith("prefill:"):
        y = switch_glu_prefill(x, inds, weights, gate, up, down, group_size, bits,
                               variant=path[len("prefill:"):])
    else:
        sort = inds.size >= SORT_MIN_PAIRS
        y = switch_glu_reference(x, inds, weights, gate, up, down, group_size, bits, sort=sort)
    if shared_fn is not None:
        y = y + shared_fn(x)
    return y if residual is None else residual.reshape(y.shape) + y


_PATHS: dict = {}


def _choose(x, inds, gate, up, down, group_size, bits, shared, shared_fn) -> str:
    if x.shape[0] > MAX_TOKENS:
        v = prefill_variant()
        if (v != "gather_qmm" and backend() is not None
                and prefill_supported(x, gate, up, down, group_size, bits)
                and _decide_prefill(x, inds, gate, up, down, group_size, bits, v)):
            return "prefill:" + v
        return "reference"
    if backend() is None or not supported(x, gate, up, down, group_size, bits) or not _decide(
            x, inds, gate, up, down, group_size, bits, None, None):
        return "reference"
    if shared_fn is not None and shared_fits(gate, up, down, shared) and _decide(
            x, inds, gate, up, down, group_size, bits, shared, shared_fn):
        return "fused-shared"
    return "kernel"


# (token, expert) pairs at or above which gather_qmm gets the pairs sorted by expert (prefill)
SORT_MIN_PAIRS = 64


def _decide(x, inds, gate, up, down, group_size, bits, shared, shared_fn) -> bool:
    n, D = x.shape
    k = inds.shape[-1]
    E, I = gate[0].shape[:2]
    cls = f"n{n}-k{k}-E{E}-D{D}-I{I}-{x.dtype}-{gate[1].dtype}".replace("mlx.core.", "")

    # the layer's own weights, fresh random activations and distinct experts per token
    def make_inputs():
        xs = mx.random.normal((n, D)).astype(x.dtype)
        idx = mx.argsort(mx.random.uniform(shape=(n, E)), axis=-1)[:, :k].astype(mx.uint32)
        w = mx.softmax(mx.random.normal((n, k)), axis=-1)
        return xs, idx, w

    # the oracle: gather_qmm in float32 (scales, biases and activations; the codes are exact),
    # since gather_qmm in bfloat16 rounds its intermediates (measured: 2.8e-2 from float64)
    f32 = [tuple(a if a.dtype == mx.uint32 else a.astype(mx.float32) for a in t)
           for t in (gate, up, down) + (tuple(shared) if shared is not None else ())]

    def oracle(xs, idx, w):
        x32 = xs.astype(mx.float32)
        y = switch_glu_reference(x32, idx, w, *f32[:3], group_size, bits)
        if shared is not None:
            q = dict(transpose=True, group_size=group_size, bits=bits)
            h = nn.silu(mx.quantized_matmul(x32, *f32[3], **q)) * mx.quantized_matmul(x32, *f32[4], **q)
            y = y + mx.quantized_matmul(h, *f32[5], **q)
        return y

    if shared is None:
        def custom(xs, idx, w):
            return switch_glu_kernel(xs, idx, w, gate, up, down, group_size, bits)

        def builtin(xs, idx, w):
            return switch_glu_reference(xs, idx, w, gate, up, down, group_size, bits)

        return selection.use_custom("moe_experts", f"affine{bits}g{group_size}", cls,
                                    make_inputs, custom, builtin, oracle, TOL[x.dtype])

    # the shared expert folded into the launches, against the routed kernels + shared_fn
    def fused(xs, idx, w):
        return switch_glu_kernel(xs, idx, w, gate, up, down, group_size, bits, shared=shared)

    def beside(xs, idx, w):
        return switch_glu_kernel(xs, idx, w, gate, up, down, group_size, bits) + shared_fn(xs)

    return selection.use_custom("moe_experts_shared", f"affine{bits}g{group_size}", cls,
                                make_inputs, fused, beside, oracle, TOL[x.dtype])


# ---------------------------------------------------------------- prefill (many tokens)

ENV_PREFILL = "MARLIN_MLX_MOE_PREFILL"
PREFILL_VARIANTS = ("dequant_gather_mm", "dequant_used", "dequant_padded_bmm", "dequant_blocks",
                    "quant_blocks", "per_expert", "per_expert_qmm", "gather_qmm")
BLOCK_ROWS = 64  # dequant_blocks: rows per block (one expert each); $MARLIN_MLX_MOE_BLOCK_ROWS
DEFAULT_PREFILL = "quant_blocks"


def prefill_variant() -> str:
    """The prefill path to try against gather_qmm: $MARLIN_MLX_MOE_PREFILL or the default."""
    v = os.environ.get(ENV_PREFILL, "").strip().lower() or DEFAULT_PREFILL
    if v not in PREFILL_VARIANTS:
        raise ValueError(f"{ENV_PREFILL}={v!r}: expected one of {', '.join(PREFILL_VARIANTS)}")
    return v


def prefill_supported(x, gate, up, down, group_size, bits) -> bool:
    return (x.dtype in DTYPES and all(t[2] is not None for t in (gate, up, down))
            and all(t[1].dtype in DTYPES for t in (gate, up, down)))


def _dequant(t, group_size, bits, dtype, after=None):
    """(w, scales, biases), stacked (E, N, .) or 2-D, -> dense weights in dtype: one launch of
    the dequantize kernel on a GPU (ordered after `after`, so a layer's transient dense
    experts are not made ahead of its activations), mx.dequantize elsewhere."""
    w, s, b = t
    if (backend() is None or bits not in _dq.BITS or dtype not in _dq.DTYPES or b is None
            or s.dtype not in _dq.DTYPES or group_size % 32):
        return mx.dequantize(w, s, b, group_size=group_size, bits=bits).astype(dtype)
    rows = w.size // w.shape[-1]
    out = _dq.dequantize_kernel(w.reshape(rows, w.shape[-1]), s.reshape(rows, s.shape[-1]),
                                b.reshape(rows, b.shape[-1]), group_size, bits, dtype, after=after)
    return out.reshape(*w.shape[:-1], out.shape[-1])


def _sort_pairs(x, inds):
    """One row per (token, expert) pair ordered by expert: (rows (n*k, D), experts (n*k,),
    order) with rows[i] = x[order[i] // k]."""
    k = inds.shape[-1]
    flat = inds.flatten()
    order = mx.argsort(flat)
    return x[order // k], flat[order], order


def _combine(y, order, weights, n, k, dtype):
    """Sorted per-pair outputs (n*k, D) -> the weighted sum per token (n, D)."""
    y = y[mx.argsort(order)].reshape(n, k, -1)
    return (y * weights.reshape(n, k, 1).astype(y.dtype)).sum(axis=1).astype(dtype)


def _gather_mm_glu(h, idx, Wg, Wu, down_fn):
    """h (m, D) sorted by expert idx (m,); Wg/Wu dense (E', I, D). M = 1 per row with
    sorted indices is the case MLX's CUDA backend runs as one grouped GEMM."""
    h3 = h.reshape(h.shape[0], 1, h.shape[1])
    q = dict(rhs_indices=idx, sorted_indices=True)
    g = mx.gather_mm(h3, Wg.swapaxes(-1, -2), **q)
    u = mx.gather_mm(h3, Wu.swapaxes(-1, -2), **q)
    a = nn.silu(g) * u
    return mx.gather_mm(a, down_fn(a).swapaxes(-1, -2), **q).reshape(h.shape[0], -1)


def switch_glu_prefill(x, inds, weights, gate, up, down, group_size: int = 64, bits: int = 4,
                       variant: str = DEFAULT_PREFILL):
    """The routed experts for many tokens by one of PREFILL_VARIANTS (see the module doc);
    the same contract as switch_glu_reference. Computes in x's dtype."""
    if variant == "gather_qmm":
        return switch_glu_reference(x, inds, weights, gate, up, down, group_size, bits, sort=True)
    if variant not in PREFILL_VARIANTS:
        raise ValueError(f"unknown prefill variant {variant!r}: expected one of "
                         f"{', '.join(PREFILL_VARIANTS)}")
    n, k = inds.shape
    dt = x.dtype
    if variant in ("dequant_blocks", "quant_blocks"):
        quant = (variant == "quant_blocks"
                 and block_qmm.supported(dt, x.shape[-1], (gate, up), group_size, bits)
                 and block_qmm.supported(dt, up[0].shape[1], (down,), group_size, bits))
        return _blocks(x, inds, weights, gate, up, down, group_size, bits, quant)
    h, idx, order = _sort_pairs(x, inds)
    if variant in ("dequant_gather_mm", "dequant_used"):
        if variant == "dequant_used":
            used = np.unique(np.array(idx))  # the one host sync
            if used.size < gate[0].shape[0]:
                remap = np.zeros(gate[0].shape[0], np.uint32)
                remap[used] = np.arange(used.size, dtype=np.uint32)
                idx = mx.array(remap)[idx]
                sel = mx.array(used.astype(np.uint32))
                gate, up, down = (tuple(a[sel] for a in t) for t in (gate, up, down))
        Wg = _dequant(gate, group_size, bits, dt, after=h)
        Wu = _dequant(up, group_size, bits, dt, after=h)
        y = _gather_mm_glu(h, idx, Wg, Wu, lambda a: _dequant(down, group_size, bits, dt, after=a))
        return _combine(y, order, weights, n, k, dt)
    idx_np = np.array(idx)  # the one host sync
    counts = np.bincount(idx_np, minlength=gate[0].shape[0])
    if variant == "dequant_padded_bmm":
        return _combine(_padded_bmm(h, idx_np, counts, gate, up, down, group_size, bits),
                        order, weights, n, k, dt)
    # per expert: contiguous row blocks
    q = dict(transpose=True, group_size=group_size, bits=bits)
    parts, start = [], 0
    for e in np.nonzero(counts)[0].tolist():
        he = h[start:start + int(counts[e])]
        start += int(counts[e])
        ge, ue, de = (tuple(a[e] for a in t) for t in (gate, up, down))
        if variant == "per_expert_qmm":
            a = nn.silu(mx.quantized_matmul(he, *ge, **q)) * mx.quantized_matmul(he, *ue, **q)
            parts.append(mx.quantized_matmul(a, *de, **q))
        else:
            a = (nn.silu(he @ _dequant(ge, group_size, bits, dt, after=he).T)
                 * (he @ _dequant(ue, group_size, bits, dt, after=he).T))
            parts.append(a @ _dequant(de, group_size, bits, dt, after=a).T)
    return _combine(mx.concatenate(parts), order, weights, n, k, dt)


def _padded_bmm(h, idx_np, counts, gate, up, down, group_size, bits):
    """Sorted rows h (m, D) -> per-pair outputs (m, D): the used experts' row blocks padded
    to C rows (zeros), batched matmuls over (E', C, .), the real rows taken back."""
    m, D = h.shape
    used = np.nonzero(counts)[0]
    cnt = counts[used]
    C = int(-(-cnt.max() // 8) * 8)  # a multiple of 8 keeps the batched GEMM's rows aligned
    first = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    c = np.arange(C)
    src = np.where(c[None, :] < cnt[:, None], first[:, None] + c[None, :], m)  # m: a zero row
    hp = mx.concatenate([h, mx.zeros((1, D), h.dtype)])[mx.array(src.ravel().astype(np.uint32))]
    hp = hp.reshape(used.size, C, D)
    if used.size < gate[0].shape[0]:
        sel = mx.array(used.astype(np.uint32))
        gate, up, down = (tuple(a[sel] for a in t) for t in (gate, up, down))
    dt = h.dtype
    a = (nn.silu(hp @ _dequant(gate, group_size, bits, dt, after=hp).swapaxes(-1, -2))
         * (hp @ _dequant(up, group_size, bits, dt, after=hp).swapaxes(-1, -2)))
    y = a @ _dequant(down, group_size, bits, dt, after=a).swapaxes(-1, -2)  # (E', C, D)
    slot = np.zeros(counts.size, np.int64)
    slot[used] = np.arange(used.size)
    pos = np.arange(m) - np.concatenate([[0], np.cumsum(counts)[:-1]])[idx_np]
    back = (slot[idx_np] * C + pos).astype(np.uint32)
    return y.reshape(used.size * C, -1)[mx.array(back)]


def _blocks(x, inds, weights, gate, up, down, group_size, bits, quant=False):
    """The routed experts of x (n, D) with no host sync: the (token, expert) pairs sorted by
    expert fill blocks of BLOCK_ROWS, expert e's from its own first block on (zero rows pad
    the rest), every block is one expert's product, and each pair's row is read back by
    index. One gather builds the blocks and one takes the pairs back. The products: with
    `quant`, kernels/block_qmm.py on the quantized experts (two launches, spare blocks
    skipped); else dequantized experts and MLX's gather_mm."""
    n, D = x.shape
    k = inds.shape[-1]
    m = n * k
    E = gate[0].shape[0]
    bm = block_qmm.BLOCK if quant else int(os.environ.get("MARLIN_MLX_MOE_BLOCK_ROWS", BLOCK_ROWS))
    nblk = cdiv(m, bm) + E  # sum over experts of ceil(count / bm) never exceeds it
    flat = inds.flatten()
    order = mx.argsort(flat)
    idx = flat[order]
    counts = (idx[:, None] == mx.arange(E, dtype=idx.dtype)[None, :]).astype(mx.int32).sum(0)
    blocks = (counts + bm - 1) // bm
    block_end = mx.cumsum(blocks)
    row_start = mx.cumsum(counts) - counts
    dest = (block_end - blocks)[idx] * bm + mx.arange(m, dtype=mx.int32) - row_start[idx]
    src = mx.full((nblk * bm,), n, mx.uint32)  # n: past x's rows, a zero row
    src[dest] = (order // k).astype(mx.uint32)
    hp = gather_rows(x, src).reshape(nblk, bm, D)
    # the expert of block b: how many experts' blocks end at or before it (spare blocks: E - 1)
    owner = (block_end[None, :] <= mx.arange(nblk, dtype=mx.int32)[:, None]).astype(mx.int32)
    owner = mx.minimum(owner.sum(1), E - 1).astype(mx.uint32)
    dt = x.dtype
    if quant:
        used = block_end[-1:]
        a = block_qmm.block_qmm(hp.reshape(nblk * bm, D), owner, used, (gate, up), group_size, bits)
        y = block_qmm.block_qmm(a, owner, used, (down,), group_size, bits)
        return _take_back(y, dest, order, weights, n, k, dt)
    q = dict(rhs_indices=owner, sorted_indices=True)
    a = (nn.silu(mx.gather_mm(hp, _dequant(gate, group_size, bits, dt, after=hp).swapaxes(-1, -2),
                              **q))
         * mx.gather_mm(hp, _dequant(up, group_size, bits, dt, after=hp).swapaxes(-1, -2), **q))
    y = mx.gather_mm(a, _dequant(down, group_size, bits, dt, after=a).swapaxes(-1, -2), **q)
    return _take_back(y.reshape(nblk * bm, -1), dest, order, weights, n, k, dt)


def _take_back(y, dest, order, weights, n, k, dt):
    """Block rows y (blocks * rows, D) -> the routing-weighted sum over each token's pairs."""
    y = gather_rows(y, dest[mx.argsort(order)].astype(mx.uint32)).reshape(n, k, -1)
    return (y * weights.reshape(n, k, 1).astype(y.dtype)).sum(axis=1).astype(dt)


PREFILL_BUCKET_MAX = 4096


def _decide_prefill(x, inds, gate, up, down, group_size, bits, variant) -> bool:
    """The prefill variant against gather_qmm (sorted), checked against the float32 oracle;
    measured once per power-of-two token bucket (prompt lengths vary)."""
    n, D = x.shape
    k = inds.shape[-1]
    E, I = gate[0].shape[:2]
    nb = min(max(16, 1 << (n - 1).bit_length()), PREFILL_BUCKET_MAX)
    cls = f"n{nb}-k{k}-E{E}-D{D}-I{I}-{x.dtype}-{gate[1].dtype}".replace("mlx.core.", "")

    def make_inputs():
        xs = mx.random.normal((nb, D)).astype(x.dtype)
        idx = mx.argsort(mx.random.uniform(shape=(nb, E)), axis=-1)[:, :k].astype(mx.uint32)
        return xs, idx, mx.softmax(mx.random.normal((nb, k)), axis=-1)

    f32 = [tuple(a if a.dtype == mx.uint32 else a.astype(mx.float32) for a in t)
           for t in (gate, up, down)]

    def oracle(xs, idx, w):
        return switch_glu_reference(xs.astype(mx.float32), idx, w, *f32, group_size, bits, sort=True)

    def custom(xs, idx, w):
        return switch_glu_prefill(xs, idx, w, gate, up, down, group_size, bits, variant)

    def builtin(xs, idx, w):
        return switch_glu_reference(xs, idx, w, gate, up, down, group_size, bits, sort=True)

    return selection.use_custom(f"moe_prefill_{variant}", f"affine{bits}g{group_size}", cls,
                                make_inputs, custom, builtin, oracle, TOL[x.dtype])


def compile_cases():
    """Metal/CUDA compile checks: GLM-4.7-Flash's and Qwen3-30B-A3B's expert shapes (decode),
    8-bit, 3-bit (codes straddling words) and float32 activations."""
    U32, F32, BF16, F16 = mx.uint32, mx.float32, mx.bfloat16, mx.float16
    out = []
    for name, dt, bits, E, k, D, I, n in (("glm-4.7-flash", BF16, 4, 64, 4, 2048, 1536, 1),
                                          ("qwen3-30b", BF16, 4, 128, 8, 2048, 768, 1),
                                          ("b8", F16, 8, 64, 4, 2048, 1536, 4),
                                          ("b3", F32, 3, 16, 2, 512, 256, 3)):
        R, SK = config(n * k, I, D // 32, True)
        t = _template(dt, dt, F32, bits, 64, R, SK, k, E, D, I)
        out.append((f"moe-gate-up-{name}", GATE_UP, [dt, U32, F32, U32, dt, dt, U32, dt, dt],
                     [1 << 20] * 9, [F32], t))
        R, SK = config(n, D, k * I // 32, False)
        t = _template(F32, dt, dt, bits, 64, R, SK, k, E, I, D)
        out.append((f"moe-down-{name}", DOWN, [F32, U32, U32, dt, dt], [1 << 20] * 5, [dt], t))
        if name in ("glm-4.7-flash", "b3"):  # with a shared expert slot
            R, SK = config(n * (k + 1), I, D // 32, True)
            t = _template(dt, dt, F32, bits, 64, R, SK, k, E, D, I)
            out.append((f"moe-gate-up-shared-{name}", GATE_UP_SHARED,
                        [dt, U32, F32] + [U32, dt, dt] * 4, [1 << 20] * 15, [F32], t))
            R, SK = config(n, D, (k + 1) * I // 32, False)
            t = _template(F32, dt, dt, bits, 64, R, SK, k, E, I, D)
            out.append((f"moe-down-shared-{name}", DOWN_SHARED, [F32, U32] + [U32, dt, dt] * 2,
                        [1 << 20] * 8, [dt], t))
            out.append((f"moe-down-shared-res-{name}", DOWN_SHARED_RES,
                        [F32, U32] + [U32, dt, dt] * 2 + [dt], [1 << 20] * 9, [dt], t))
    return out
