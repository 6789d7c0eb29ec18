"""mla_decode: a multi-head latent attention (MLA) decode token's projections in few launches.

GLM-4.7-Flash's batch-1 decode ran ~30 launches per layer on the H200, ~1400 per token, and
was host-bound (CUPTI: 6.7 ms of kernels in a 13.5 ms step). Around the attention, a layer's
token went through the input norm, q_a and kv_a GEMVs, the q_a and kv_a norms, q_b, a reshape,
slices, the per-head `embed_q` product, two RoPEs, two concatenations, then after attention
the per-head `unembed_out` product, a transpose copy, o_proj and the residual add. Here:

- q_a and kv_a share one projection (`models.glm4_moe_lite.Attention.fuse_qkv`), its input
  RMSNorm fused in (`fused_linear.norm_linear`);
- q_b reads the q_a part of that row in place with the q_a norm fused in (`prefix=True`);
- `absorbed_query` (`src/mla_q.h`): each head's no-rope query through `embed_q` (a per-head
  GEMV on the shared GEMV body), its rope query rotated beside it, and the cache row (normed
  latent | rotated rope key): one launch for what was ~10;
- `heads_linear` (`src/qmv_heads.h`): the attention output through `unembed_out`, written
  head after head as o_proj reads it; o_proj takes the residual (`fused_linear`).

Every kernel is self-tested against the MLX ops it replaces and timed against them on first
use (kernels/selection.py); where it loses or fails, the model runs those ops. CPU: the ops.
"""

from __future__ import annotations

import mlx.core as mx

from . import fused_linear, selection
from . import launch as _launch
from .fused_linear import eps_bits
from .launch import KernelSpec, backend, cdiv, launch_planned
from .qmv import DTYPES, PREFETCH, XKIND, config

SPEC_Q = KernelSpec("marlin_mla_q", "mla_q.h",
                    ("x", "w", "scales", "biases", "kv", "kvn", "pos", "inv_freq"), ("y", "kvrow"))
# mla_q writing the cache row in place (into an input): see MLACacheTrace in models/mla_cache.py
SPEC_Q_CACHE = KernelSpec("marlin_mla_q_cache", "mla_q_cache.h", SPEC_Q.inputs + ("cache",),
                          ("y",))
SPEC_HEADS = KernelSpec("marlin_qmv_heads", "qmv_heads.h", ("x", "w", "scales", "biases"), ("y",))
SELF_TEST_TOL = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 1.5e-2}


# ------------------------------------------------------------------ MLX references

def per_head_matmul(x, w, scales, biases, group_size, bits, transpose=True, mode="affine"):
    """x (..., H, L, in) against H quantized matrices (H, out, in): MLX's batched
    quantized_matmul, or dequantize + matmul for float32 on CUDA (MLX 0.32 has no batched
    float32 kernel there: "No implementation for problem shape")."""
    if x.dtype == mx.float32 and backend() == "cuda":
        wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
        return x @ (wd.swapaxes(-1, -2) if transpose else wd)
    return mx.quantized_matmul(x, w, scales, biases, transpose=transpose, group_size=group_size,
                               bits=bits, mode=mode)


def interleaved_rope(x, pos, inv_freq, scale=1.0):
    """RoPE on adjacent pairs (2i, 2i + 1) as mx.fast.rope(traditional=True) computes it."""
    if scale != 1.0:
        x = x * scale
    return mx.fast.rope(x, x.shape[-1], traditional=True, base=None, scale=1.0, offset=pos,
                        freqs=1.0 / inv_freq)


def absorbed_query_reference(q, kv, w, scales, biases, kv_norm_w, pos, inv_freq, *, heads,
                             nope, q_lora_rank, eps, scale, group_size, bits):
    """The MLX ops: q (1, 1, H * (nope + rope)) and kv (1, 1, q_lora_rank + rank + rope) ->
    (query (1, H, 1, rank + rope), cache row (1, 1, 1, rank + rope))."""
    rank = w.shape[1]
    q = q.reshape(1, 1, heads, -1).transpose(0, 2, 1, 3)
    q_abs = per_head_matmul(q[..., :nope], w, scales, biases, group_size, bits)
    q_pe = interleaved_rope(q[..., nope:], pos, inv_freq, scale)
    lat = kv[..., q_lora_rank:q_lora_rank + rank]
    k_pe = interleaved_rope(kv[..., q_lora_rank + rank:], pos, inv_freq, scale)
    row = mx.concatenate([mx.fast.rms_norm(lat, kv_norm_w, eps), k_pe], axis=-1)
    return mx.concatenate([q_abs, q_pe], axis=-1), row.reshape(1, 1, 1, -1)


def heads_linear_reference(x, w, scales, biases, group_size, bits):
    """x (1, H, 1, in) through H quantized matrices -> (1, 1, H * out), heads in order."""
    y = per_head_matmul(x, w, scales, biases, group_size, bits)
    return y.transpose(0, 2, 1, 3).reshape(1, 1, -1)


# ------------------------------------------------------------------ kernels

_PLANS: dict = {}


def _gemv_template(xdt, sdt, bits, group_size, K, N, extra):
    R, SK = config(1, N, K, bits)
    template = [("T", xdt), ("S", sdt), ("XK", XKIND[xdt]), ("BITS", bits), ("GS", group_size),
                ("R", R), ("SK", SK), ("PF", PREFETCH), ("M", 1), ("MT", 1), ("K", K),
                ("N", N), *extra]
    return template, R, SK


def _finish(spec, template, grid, tg, oshapes, odts):
    kern, ktemplate = (_launch.cuda_plan_kernel(spec, template) if backend() == "cuda"
                       else (None, None))
    return template, grid, tg, oshapes, odts, kern, ktemplate


def _plan_q(xdt, sdt, bits, group_size, heads, nope, rope, rank, q_lora_rank, eps, scale,
            in_place=False):
    key = ("q", xdt, sdt, bits, group_size, heads, nope, rope, rank, q_lora_rank, eps, scale,
           in_place)
    plan = _PLANS.get(key)
    if plan is None:
        N = heads * rank
        template, R, SK = _gemv_template(
            xdt, sdt, bits, group_size, nope, N,
            (("XH", nope + rope), ("RH", rank), ("YH", rank + rope), ("H", heads),
             ("QA", q_lora_rank), ("EPS", eps_bits(eps)), ("SCALE", eps_bits(scale))))
        ntg = cdiv(N, R)  # the GEMV's threadgroups; H + 1 tail jobs follow
        template.append(("NTG", ntg))
        shapes = [(1, heads, 1, rank + rope)] + [(1, 1, 1, rank + rope)] * (not in_place)
        plan = _PLANS[key] = _finish(SPEC_Q_CACHE if in_place else SPEC_Q, template,
                                     (32 * SK * (ntg + heads + 1), 1, 1), (32 * SK, 1, 1),
                                     shapes, [xdt] * len(shapes))
    return plan


def absorbed_query_kernel(q, kv, w, scales, biases, kv_norm_w, pos, inv_freq, *, heads, nope,
                          q_lora_rank, eps, scale, group_size, bits, cache=None):
    """`absorbed_query_reference` as one launch (no checks: `absorbed_query` makes them).
    With `cache` (1, 1, capacity, rank + rope) the row is written into it at `pos`, in place,
    and the result is (query, None)."""
    rank = w.shape[1]
    rope = q.shape[-1] // heads - nope
    plan = _plan_q(q.dtype, scales.dtype, bits, group_size, heads, nope, rope, rank, q_lora_rank,
                   float(eps), float(scale), cache is not None)
    if biases.dtype != scales.dtype:
        biases = biases.astype(scales.dtype)
    inputs = [q, w, scales, biases, kv, kv_norm_w, pos, inv_freq]
    if cache is None:
        return launch_planned(SPEC_Q, inputs, *plan)
    return launch_planned(SPEC_Q_CACHE, inputs + [cache], *plan)[0], None


def heads_linear_kernel(x, w, scales, biases, group_size, bits):
    """`heads_linear_reference` as one launch."""
    H, rows = w.shape[:2]
    K = x.shape[-1]
    key = ("heads", x.dtype, scales.dtype, bits, group_size, H, rows, K)
    plan = _PLANS.get(key)
    if plan is None:
        template, R, SK = _gemv_template(x.dtype, scales.dtype, bits, group_size, K, H * rows,
                                         (("XH", K), ("RH", rows)))
        plan = _PLANS[key] = _finish(SPEC_HEADS, template, (32 * SK * cdiv(H * rows, R), 1, 1),
                                     (32 * SK, 1, 1), [(1, 1, H * rows)], [x.dtype])
    if biases.dtype != scales.dtype:
        biases = biases.astype(scales.dtype)
    return launch_planned(SPEC_HEADS, [x, w, scales, biases], *plan)[0]


def _per_head_ok(w, scales, biases, group_size, bits, K) -> bool:
    """Affine per-head weights (H, rows, K) the GEMV body covers, rows a multiple of its R."""
    R, _ = config(1, w.shape[0] * w.shape[1], K, bits)
    return (biases is not None and w.ndim == 3 and w.dtype == mx.uint32
            and w.shape[-1] * 32 == K * bits and scales.dtype in DTYPES
            and bits in (2, 3, 4, 5, 6, 8) and group_size % 32 == 0 and K % group_size == 0
            and w.shape[1] % R == 0)


# ------------------------------------------------------------------ selection

_DECISIONS: dict = {}


def _f32(a):
    return a.astype(mx.float32)


def _decide_q(xdt, sdt, heads, nope, rope, rank, q_lora_rank, eps, scale, gs, bits) -> bool:
    key = ("q", xdt, sdt, heads, nope, rope, rank, q_lora_rank, eps, scale, gs, bits,
           selection.mode())
    use = _DECISIONS.get(key)
    if use is not None:
        return use
    kw = dict(heads=heads, nope=nope, q_lora_rank=q_lora_rank, eps=eps, scale=scale,
              group_size=gs, bits=bits)
    half = mx.arange(0, rope, 2, dtype=mx.float32) / rope
    inv_freq = (1.0 / (10000.0 ** half)).astype(mx.float32)

    def make_inputs():
        w, s, b = mx.quantize(mx.random.normal((heads, rank, nope), dtype=sdt) * 0.05,
                              group_size=gs, bits=bits)
        q = mx.random.normal((1, 1, heads * (nope + rope))).astype(xdt)
        kv = mx.random.normal((1, 1, q_lora_rank + rank + rope)).astype(xdt)
        kvn = (1.0 + 0.1 * mx.random.normal((rank,))).astype(xdt)
        pos = mx.random.randint(0, 4096, (1,), dtype=mx.int32)
        return q, kv, w, s, b, kvn, pos

    def flat(pair):
        return mx.concatenate([pair[0].reshape(-1), pair[1].reshape(-1)])

    def custom(q, kv, w, s, b, kvn, pos):
        return flat(absorbed_query_kernel(q, kv, w, s, b, kvn, pos, inv_freq, **kw))

    def builtin(q, kv, w, s, b, kvn, pos):
        return flat(absorbed_query_reference(q, kv, w, s, b, kvn, pos, inv_freq, **kw))

    def reference(q, kv, w, s, b, kvn, pos):
        wd = mx.dequantize(w, s, b, group_size=gs, bits=bits).astype(mx.float32)
        qh = _f32(q).reshape(1, heads, 1, -1)
        q_abs = qh[..., :nope] @ wd.swapaxes(-1, -2)
        q_pe = interleaved_rope(qh[..., nope:], pos, inv_freq, scale)
        kvf = _f32(kv)
        lat = mx.fast.rms_norm(kvf[..., q_lora_rank:q_lora_rank + rank], _f32(kvn), eps)
        k_pe = interleaved_rope(kvf[..., q_lora_rank + rank:], pos, inv_freq, scale)
        return flat((mx.concatenate([q_abs, q_pe], axis=-1),
                     mx.concatenate([lat, k_pe], axis=-1)))

    cls = (f"H{heads}|nope{nope}|rope{rope}|rank{rank}|qa{q_lora_rank}|{xdt}|{sdt}"
           f"|eps{eps:g}|scale{scale:g}")
    use = _DECISIONS[key] = selection.use_custom(
        "mla_q", f"affine-b{bits}-g{gs}", cls, make_inputs, custom, builtin, reference,
        SELF_TEST_TOL.get(xdt, 1e-2), margin=selection.FUSION_MARGIN)
    return use


def _decide_heads(xdt, sdt, heads, rows, K, gs, bits) -> bool:
    key = ("heads", xdt, sdt, heads, rows, K, gs, bits, selection.mode())
    use = _DECISIONS.get(key)
    if use is not None:
        return use

    def make_inputs():
        w, s, b = mx.quantize(mx.random.normal((heads, rows, K), dtype=sdt) * 0.05,
                              group_size=gs, bits=bits)
        return mx.random.normal((1, heads, 1, K)).astype(xdt), w, s, b

    def reference(x, w, s, b):
        wd = mx.dequantize(w, s, b, group_size=gs, bits=bits).astype(mx.float32)
        return (_f32(x) @ wd.swapaxes(-1, -2)).transpose(0, 2, 1, 3).reshape(1, 1, -1)

    use = _DECISIONS[key] = selection.use_custom(
        "qmv_heads", f"affine-b{bits}-g{gs}", f"H{heads}|rows{rows}|K{K}|{xdt}|{sdt}",
        make_inputs, lambda x, w, s, b: heads_linear_kernel(x, w, s, b, gs, bits),
        lambda x, w, s, b: heads_linear_reference(x, w, s, b, gs, bits), reference,
        SELF_TEST_TOL.get(xdt, 1e-2))
    return use


# ------------------------------------------------------------------ what the model calls

def _quantized_per_head(m) -> bool:
    return getattr(m, "mode", None) == "affine" and "biases" in m and "scales" in m


def absorbed_query(attn, a, pos, cache=None):
    """(query (1, H, 1, rank + rope), cache row (1, 1, 1, rank + rope)) of one decode token
    from `a`, the row of attn's fused q_a | kv_a projection (its input norm applied), through
    q_b (q_a norm fused in) and `absorbed_query_kernel`; None where the fused kernels do not
    apply or lost their measurement (the caller runs the MLX ops). `cache`: a buffer (1, 1,
    capacity, rank + rope) to write the row into at `pos` in place (then the row is None)."""
    if not (fused_linear.ENABLED and backend() is not None and a.size == a.shape[-1]
            and a.dtype in DTYPES and _quantized_per_head(attn.embed_q)):
        return None
    e = attn.embed_q
    w, s, b = e["weight"], e["scales"], e["biases"]
    heads, nope, rope, rank = attn.n_heads, attn.nope, attn.rope_dim, attn.rank
    qa = attn.q_lora_rank
    rot = attn.rope
    if not (_per_head_ok(w, s, b, e.group_size, e.bits, nope) and w.shape[:2] == (heads, rank)
            and rope % 2 == 0 and (nope + rope) % 8 == 0  # 16-byte loads of each head's q
            and attn.kv_a_layernorm["weight"].dtype == a.dtype
            and a.shape[-1] == qa + rank + rope and getattr(rot, "_inv_freq", None) is not None):
        return None
    qn = attn.q_a_layernorm
    q = fused_linear.norm_linear(a, qn["weight"], qn.eps, attn.q_b_proj, prefix=True)
    if q is None:  # the prefix GEMV declined or lost its timing: q_b through the MLX ops
        q = attn.q_b_proj(qn(a[..., :qa]))
    if q.dtype != a.dtype:
        return None
    eps, scale = float(attn.kv_a_layernorm.eps), float(rot.scale)
    if not _decide_q(a.dtype, s.dtype, heads, nope, rope, rank, qa, eps, scale, e.group_size,
                     e.bits):
        return None
    if isinstance(pos, int):
        pos = mx.array([pos], mx.int32)
    if cache is not None and not (cache.dtype == a.dtype and cache.ndim == 4
                                  and cache.shape[:2] == (1, 1) and cache.shape[3] == rank + rope):
        raise ValueError(f"latent cache {cache.shape} {cache.dtype} does not take rows of "
                         f"{rank + rope} {a.dtype}")
    return absorbed_query_kernel(q, a, w, s, b, attn.kv_a_layernorm["weight"], pos,
                                 rot._inv_freq, heads=heads, nope=nope, q_lora_rank=qa, eps=eps,
                                 scale=scale, group_size=e.group_size, bits=e.bits, cache=cache)


def heads_linear(layer, x):
    """x (1, H, 1, in) through a quantized per-head layer (H, out, in) -> (1, 1, H * out) in
    one launch, or None (the caller runs the MLX ops)."""
    if not (fused_linear.ENABLED and backend() is not None and x.ndim == 4
            and x.shape[0] == x.shape[2] == 1 and x.dtype in DTYPES
            and _quantized_per_head(layer)):
        return None
    w, s, b = layer["weight"], layer["scales"], layer["biases"]
    H, rows = w.shape[:2]
    if not (_per_head_ok(w, s, b, layer.group_size, layer.bits, x.shape[-1]) and x.shape[1] == H
            and _decide_heads(x.dtype, s.dtype, H, rows, x.shape[-1], layer.group_size,
                              layer.bits)):
        return None
    return heads_linear_kernel(x, w, s, b, layer.group_size, layer.bits)


def compile_cases():
    """(id, spec, input dtypes, input sizes, output dtypes, template) for the compile checks
    (GLM-4.7-Flash's sizes)."""
    out = []
    for dt in (mx.float16, mx.bfloat16, mx.float32):
        t = _plan_q(dt, dt, 4, 64, 20, 192, 64, 512, 768, 1e-6, 1.0)[0]
        out.append((f"mla_q-{dt}".replace("mlx.core.", ""), SPEC_Q,
                    [dt, mx.uint32, dt, dt, dt, dt, mx.int32, mx.float32], [1 << 20] * 8,
                    [dt, dt], t))
        out.append((f"mla_q_cache-{dt}".replace("mlx.core.", ""), SPEC_Q_CACHE,
                    [dt, mx.uint32, dt, dt, dt, dt, mx.int32, mx.float32, dt], [1 << 20] * 9,
                    [dt], t))
        t = _gemv_template(dt, dt, 4, 64, 512, 20 * 256, (("XH", 512), ("RH", 256)))[0]
        out.append((f"qmv_heads-{dt}".replace("mlx.core.", ""), SPEC_HEADS,
                    [dt, mx.uint32, dt, dt], [1 << 20] * 4, [dt], t))
    return out
