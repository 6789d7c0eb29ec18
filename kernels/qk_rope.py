"""qk_rope: a decode token's q/k/v heads from the fused q/k/v projection, normed and rotated.

At batch-1 decode a Llama/Qwen3 layer spent five to seven launches between its q/k/v GEMV and
the cache write: slices of q, k and v (v as a copy), Qwen3's q_norm and k_norm, RoPE on q and
on k. On the H200 those were ~0.5 ms of a 4.4 ms Qwen3-8B step and as many graph nodes of host
time. `qk_norm_rope` does all of it in one launch (`src/qk_rope.h`); `reference` is the same
sequence of MLX ops the model runs otherwise (also the CPU path).
"""

from __future__ import annotations

import mlx.core as mx

from . import fused_linear
from . import launch as _launch
from . import selection
from .fused_linear import eps_bits
from .launch import KernelSpec, backend, cdiv, launch_planned

SPEC = KernelSpec("marlin_qk_rope", "qk_rope.h", ("qkv", "qn", "kn", "pos", "inv_freq"),
                  ("q", "k", "v"))
# the same, writing k and v into the KV cache buffers in place (models/cache.py KVCacheTrace)
SPEC_CACHE = KernelSpec("marlin_qk_rope_cache", "qk_rope_cache.h",
                        SPEC.inputs + ("kcache", "vcache", "cap"), ("q",))
HEADS_PER_GROUP = 4
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
SELF_TEST_TOL = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 1.5e-2}


def inv_freq_table(head_dim: int, base=None, freqs=None) -> mx.array:
    """float32 inverse frequencies (head_dim / 2): from `base` as mx.fast.rope computes them, or
    1 / `freqs` (the wavelengths mx.fast.rope takes for scaled variants)."""
    if freqs is not None:
        return (1.0 / freqs.astype(mx.float32)).astype(mx.float32)
    return (1.0 / (float(base) ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
            ).astype(mx.float32)


def reference(qkv, n_heads, n_kv_heads, head_dim, pos, base, freqs, q_norm_w=None,
              k_norm_w=None, eps=1e-6, scale=1.0):
    """The MLX ops the model runs at decode: qkv (B, 1, (H + 2 KV) * D) -> q, k, v (B, h, 1, D)."""
    B = qkv.shape[0]
    nq, nk = n_heads * head_dim, n_kv_heads * head_dim
    q = qkv[..., :nq].reshape(B, n_heads, 1, head_dim)
    k = qkv[..., nq:nq + nk].reshape(B, n_kv_heads, 1, head_dim)
    v = qkv[..., nq + nk:].reshape(B, n_kv_heads, 1, head_dim)
    if q_norm_w is not None:
        q, k = mx.fast.rms_norm(q, q_norm_w, eps), mx.fast.rms_norm(k, k_norm_w, eps)
    if scale != 1.0:
        q, k = q * scale, k * scale

    def rope(a):
        return mx.fast.rope(a, head_dim, traditional=False, base=base, scale=1.0, offset=pos,
                            freqs=freqs)
    return rope(q), rope(k), v


def supported(qkv, n_heads, n_kv_heads, head_dim, q_norm_w, pos) -> bool:
    B = qkv.shape[0]
    return (qkv.dtype in DTYPES and qkv.ndim == 3 and qkv.shape[1] == 1
            and qkv.shape[2] == (n_heads + 2 * n_kv_heads) * head_dim and head_dim % 64 == 0
            and (q_norm_w is None or q_norm_w.dtype == qkv.dtype)
            and (isinstance(pos, int) or (pos.size in (1, B) and pos.ndim <= 1)))


_PLANS: dict = {}


def _plan(dtype, B, n_heads, n_kv_heads, head_dim, norm, per_row, eps, scale, in_place=False):
    """(template, grid, threadgroup, output shapes, output dtypes, kernel object, its template),
    cached: the host cost of a launch counts at every decode step."""
    key = (dtype, B, n_heads, n_kv_heads, head_dim, norm, per_row, eps, scale, in_place)
    plan = _PLANS.get(key)
    if plan is None:
        template = [("T", dtype), ("H", n_heads), ("KV", n_kv_heads), ("D", head_dim),
                    ("NORM", int(norm)), ("PB", int(per_row)), ("EPS", eps_bits(eps)),
                    ("SCALE", eps_bits(scale)), ("HPT", HEADS_PER_GROUP)]
        nh = n_heads + 2 * n_kv_heads
        grid = (32 * HEADS_PER_GROUP * cdiv(nh, HEADS_PER_GROUP), B, 1)
        spec = SPEC_CACHE if in_place else SPEC
        kern, ktemplate = (_launch.cuda_plan_kernel(spec, template) if backend() == "cuda"
                           else (None, None))
        shapes = [(B, n_heads, 1, head_dim)]
        if not in_place:
            shapes += [(B, n_kv_heads, 1, head_dim)] * 2
        plan = _PLANS[key] = (template, grid, (32 * HEADS_PER_GROUP, 1, 1), shapes,
                              [dtype] * len(shapes), kern, ktemplate)
    return plan


def qk_norm_rope(qkv, n_heads, n_kv_heads, head_dim, pos, inv_freq, q_norm_w=None,
                 k_norm_w=None, eps=1e-6, scale=1.0, cache=None):
    """The custom kernel: qkv (B, 1, (H + 2 KV) * D) -> q (B, H, 1, D), k and v (B, KV, 1, D).
    `pos`: int or int32 array of 1 or B positions; `inv_freq`: inv_freq_table(...).

    `cache` = (keys, values, cap): buffers (B, KV, capacity, D) of the rope's dtype and cap an
    int32 array [capacity]. k and v are then written into row `pos` (one position for all
    rows) of the buffers, in place, and come back as None: the caller must own those rows
    and read them only through something that takes q (models/cache.py KVCacheTrace)."""
    if isinstance(pos, int):
        pos = mx.array([pos], dtype=mx.int32)
    elif pos.dtype != mx.int32:
        pos = pos.astype(mx.int32)
    norm = q_norm_w is not None
    B = qkv.shape[0]
    if cache is not None:
        keys, values, cap = cache
        want = (B, n_kv_heads, keys.shape[2], head_dim)
        if (pos.size != 1 or keys.shape != want or values.shape != want
                or keys.dtype != qkv.dtype or values.dtype != qkv.dtype):
            raise ValueError(f"qk_norm_rope: cache buffers {keys.shape} / {values.shape} do not "
                             f"take rows of {want} in {qkv.dtype} at one shared position")
    template, grid, tg, oshape, odt, kern, ktemplate = _plan(
        qkv.dtype, B, n_heads, n_kv_heads, head_dim, norm, pos.size > 1, eps, scale,
        cache is not None)
    inputs = [qkv, q_norm_w if norm else qkv, k_norm_w if norm else qkv, pos, inv_freq]
    if cache is None:
        return tuple(launch_planned(SPEC, inputs, template, grid, tg, oshape, odt, kern,
                                    ktemplate))
    q = launch_planned(SPEC_CACHE, inputs + list(cache), template, grid, tg, oshape, odt, kern,
                       ktemplate)[0]
    return q, None, None


_DECISIONS: dict = {}


def use_kernel(qkv, n_heads, n_kv_heads, head_dim, pos, base, freqs, q_norm_w=None, eps=1e-6,
               scale=1.0) -> bool:
    """Whether to run `qk_norm_rope` for this decode step (GPU backend, supported shapes, and the
    measured selection, once per shape: checked against a float32 reference, timed against
    `reference`'s MLX ops)."""
    if (not fused_linear.ENABLED or backend() is None
            or not supported(qkv, n_heads, n_kv_heads, head_dim, q_norm_w, pos)):
        return False
    B = qkv.shape[0]
    per_row = not isinstance(pos, int) and pos.size > 1
    key = (qkv.dtype, B, n_heads, n_kv_heads, head_dim, q_norm_w is not None, per_row, eps,
           scale, base is None, selection.mode())
    use = _DECISIONS.get(key)
    if use is None:
        use = _DECISIONS[key] = _measure(qkv.dtype, B, n_heads, n_kv_heads, head_dim, per_row,
                                         base, freqs, q_norm_w is not None, eps, scale)
    return use


def _measure(dt, B, H, KV, D, per_row, base, freqs, norm, eps, scale) -> bool:
    inv = inv_freq_table(D, base, freqs)
    width = (H + 2 * KV) * D

    def make_inputs():
        pos = mx.random.randint(0, 4096, (B if per_row else 1,)).astype(mx.int32)
        qn = (1.0 + 0.1 * mx.random.normal((D,))).astype(dt)
        kn = (1.0 + 0.1 * mx.random.normal((D,))).astype(dt)
        return mx.random.normal((B, 1, width)).astype(dt), qn, kn, pos

    def custom(qkv, qn, kn, pos):
        return mx.concatenate([a.reshape(B, -1) for a in qk_norm_rope(
            qkv, H, KV, D, pos, inv, qn if norm else None, kn if norm else None, eps, scale)], 1)

    def run_reference(qkv, qn, kn, pos, as_f32=False):
        if as_f32:
            qkv, qn, kn = (a.astype(mx.float32) for a in (qkv, qn, kn))
        outs = reference(qkv, H, KV, D, pos if per_row else pos[0], base, freqs,
                         qn if norm else None, kn if norm else None, eps, scale)
        return mx.concatenate([a.reshape(B, -1) for a in outs], 1)

    def f32_reference(qkv, qn, kn, pos):
        return run_reference(qkv, qn, kn, pos, True)

    fmt = "rope-" + ("base" if base is not None else "freqs") + ("-norm" if norm else "")
    cls = f"B{B}|{dt}|H{H}|KV{KV}|D{D}|{'per-row' if per_row else 'shared'}"
    return selection.use_custom("qk_rope", fmt, cls, make_inputs, custom, run_reference,
                                f32_reference, SELF_TEST_TOL.get(dt, 1e-2),
                                margin=selection.FUSION_MARGIN)


def compile_cases():
    """(id, spec, input dtypes, input sizes, output dtypes, template) for the compile checks."""
    out = []
    for dt in DTYPES:
        for norm, pb in ((1, 0), (0, 1)):
            t = [("T", dt), ("H", 32), ("KV", 8), ("D", 128), ("NORM", norm), ("PB", pb),
                 ("EPS", eps_bits(1e-6)), ("SCALE", eps_bits(1.0)), ("HPT", HEADS_PER_GROUP)]
            out.append((f"qk_rope-{dt}-norm{norm}-pb{pb}".replace("mlx.core.", ""), SPEC,
                        [dt, dt, dt, mx.int32, mx.float32], [1 << 16, 128, 128, 8, 64],
                        [dt] * 3, t))
            if not pb:
                out.append((f"qk_rope_cache-{dt}-norm{norm}".replace("mlx.core.", ""),
                            SPEC_CACHE, [dt, dt, dt, mx.int32, mx.float32, dt, dt, mx.int32],
                            [1 << 16, 128, 128, 8, 64, 1 << 20, 1 << 20, 1], [dt], t))
    return out

