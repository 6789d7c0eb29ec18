"""Decode attention over contiguous KV buffers: the single-token step of a Llama/Qwen3 KVCache.

Layouts: queries (B, num_heads, dim), one token per sequence (already written into the
buffers); keys / values (B, num_kv_heads, capacity, dim), the KVCache's buffers read in place;
context_lens (B,) int32, the rows sequence b attends to. GQA: query head j reads kv head
j // (num_heads // num_kv_heads).

Why not MLX's SDPA: its inputs are the filled rows, a slice whose length changes every token,
so a decode step that calls it cannot be compiled once for every position. Here the length is
an array, so one compiled step (models/base.py CompiledDecoder, models/cache.py KVCacheTrace)
serves all of them, and the buffer's capacity is read at run time, so a growing buffer needs no
new kernel.

Kernel (src/buffer_attention.h): one threadgroup of NW warps per (partition of the context,
sequence, kv head); a warp reads chunks of TPW rows with one load per lane and row, a chunk's
rows all at once, under an online softmax. A short buffer is one partition that writes the
output itself (src/buffer_attention_one.h); a longer one is split into about TARGET_TGS
threadgroups, combined by the paged-attention reduce (src/paged_attention_reduce.h). Heads it
does not cover (more than 32 query values per lane, threadgroup memory over budget, other head
sizes) take the paged kernel reading each buffer as one block
(paged_attention.paged_attention_kernel with whole_buffers=True). On the CPU, or where the
selection keeps MLX, `reference` runs (plain MLX, float32 softmax).
"""

from __future__ import annotations

import mlx.core as mx

from . import paged_attention as _paged
from . import selection
from .launch import KernelSpec, backend, cdiv, launch

SPEC = KernelSpec("marlin_buffer_attn", "buffer_attention.h",
                  ("queries", "keys", "values", "context_lens", "meta"), ("part_o", "part_ml"))
# one partition over the whole context, writing the output itself (no reduce launch)
SPEC_ONE = KernelSpec("marlin_buffer_attn_one", "buffer_attention_one.h", SPEC.inputs, ("out",))
NW = 8                      # warps per threadgroup
TPW = 8                     # rows a warp loads at once (a chunk)
ONE_MAX_CHUNKS = 4          # one partition while each warp has at most this many chunks
TARGET_TGS = 264            # split-K: threadgroups to aim for (two per SM of the H200's 132)
HEAD_DIMS = (64, 128, 256)
MAX_LANE_VALUES = 32        # query heads x columns per lane held in registers
# The kernel is what lets a decode step compile as one function (no Python per layer, no
# cache copies): host time that a kernel-against-kernel timing does not see. So it is kept
# unless MLX's SDPA is clearly faster.
MARGIN = 1.25

_TABLES: dict = {}
_PLANS: dict = {}
_DECISIONS: dict = {}


def _identity_table(B: int) -> mx.array:
    """(B, 1) int32 [[0], [1], ...]: for the paged kernel, sequence b's one block is buffer b."""
    t = _TABLES.get(B)
    if t is None:
        t = _TABLES[B] = mx.arange(B, dtype=mx.int32).reshape(B, 1)
        mx.eval(t)
    return t


def reference(queries, keys, values, context_lens, scale):
    """Plain MLX ops, float32 softmax: the oracle and the CPU path."""
    return _paged._reference(queries, keys, values, _identity_table(queries.shape[0]),
                             context_lens, scale, values.shape[3])


def fits(dtype, nh, kvh, dk, dv) -> bool:
    """Whether src/buffer_attention.h covers these heads (else the paged kernel does)."""
    g = nh // kvh if kvh and nh % kvh == 0 else 0
    smem = 4 * NW * g * (dk + 2)  # the warps' p @ V sums and (max, sum) per head
    return (dtype in _paged.DTYPES and dk == dv and dk in HEAD_DIMS and g >= 1
            and g * dk // 32 <= MAX_LANE_VALUES and smem <= _paged.SMEM_BUDGET)


def supported(dtype, nh, kvh, dk, dv) -> bool:
    """Whether a custom kernel covers `buffer_attention` for these heads on this backend."""
    return backend() is not None and (fits(dtype, nh, kvh, dk, dv)
                                      or _paged.supported(dtype, nh, kvh, 0, dk, dv))


def _layout(B: int, kvh: int, cap: int) -> tuple:
    """(partitions, chunks per warp, one pass) for a buffer of `cap` rows: one partition while
    every warp's chain of chunks stays short, else about TARGET_TGS threadgroups."""
    chunks = cdiv(cap, NW * TPW)
    if chunks <= ONE_MAX_CHUNKS:
        return 1, chunks, True
    cpw = max(1, chunks // cdiv(TARGET_TGS, B * kvh))  # rounded down: at least the target
    return cdiv(chunks, cpw), cpw, False


def _plan(dtype, B, nh, kvh, d, cap):
    key = (dtype, B, nh, kvh, d, cap, NW, TPW)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 256:  # a growing buffer makes one per capacity
            _PLANS.clear()
        np_, cpw, one = _layout(B, kvh, cap)
        template = [("T", dtype), ("XK", _paged.XKIND[dtype]), ("D", d), ("KVH", kvh),
                    ("G", nh // kvh), ("NW", NW), ("TPW", TPW)]
        ch = cdiv(d, _paged.NT)
        rtemplate = [("T", dtype), ("DV", d), ("NT", _paged.NT), ("CH", ch)]
        shapes = [(B, nh, d)] if one else [(B, nh, np_, d), (B, nh, np_, 2)]
        plan = _PLANS[key] = (template, (32 * NW * np_, B * kvh, 1), (32 * NW, 1, 1), shapes,
                              [dtype] if one else [mx.float32, mx.float32],
                              rtemplate, (_paged.NT * B * nh * ch, 1, 1), (_paged.NT, 1, 1),
                              np_, cpw, one)
    return plan


def buffer_attention_kernel(queries, keys, values, context_lens, scale):
    """The custom kernels alone (no validation, no fallback to MLX)."""
    B, nh, d = queries.shape
    _, kvh, cap, _ = keys.shape
    if not fits(queries.dtype, nh, kvh, d, values.shape[3]):
        return _paged.paged_attention_kernel(queries, keys, values, _identity_table(B),
                                             context_lens, scale, values.shape[3],
                                             whole_buffers=True)
    (template, grid, tg, oshapes, odts, rtemplate, rgrid, rtg, np_, cpw,
     one) = _plan(queries.dtype, B, nh, kvh, d, cap)
    meta = _paged._meta(cpw, np_, scale, cap)
    inputs = [queries, keys, values, context_lens, meta]
    if one:
        return launch(SPEC_ONE, inputs, template, grid, tg, oshapes, odts)[0]
    part_o, part_ml = launch(SPEC, inputs, template, grid, tg, oshapes, odts)
    return launch(_paged.REDUCE_SPEC, [part_o, part_ml, meta], rtemplate, rgrid, rtg,
                  [(B, nh, d)], [queries.dtype])[0]


def buffer_attention(queries, keys, values, context_lens, scale, kernel: bool):
    """(B, num_heads, v_dim) in the queries' dtype. `kernel`: run the custom kernels (the
    caller asked `use_kernel` or `supported`), else `reference`."""
    if kernel:
        return buffer_attention_kernel(queries, keys, values, context_lens, scale)
    return reference(queries, keys, values, context_lens, scale)


def use_kernel(dtype, nh, kvh, dk, dv) -> bool:
    """Whether to attend over KVCache buffers with the kernel rather than MLX's SDPA over the
    filled rows: supported, its self-test passed, and it timed within MARGIN of SDPA (measured
    once per shape class, batch 1 at a 1000-token context)."""
    key = (dtype, nh, kvh, dk, dv, selection.mode())
    use = _DECISIONS.get(key)
    if use is None:
        use = _DECISIONS[key] = (supported(dtype, nh, kvh, dk, dv)
                                 and _decide(dtype, nh, kvh, dk, dv))
    return use


def _decide(dtype, nh, kvh, dk, dv) -> bool:
    cap, ctx, scale = 1024, 1000, dk ** -0.5

    def make_inputs():
        kb = mx.random.normal((1, kvh, cap, dk)).astype(dtype)
        vb = mx.random.normal((1, kvh, cap, dv)).astype(dtype)
        return mx.random.normal((1, nh, dk)).astype(dtype), kb, vb, mx.array([ctx], mx.int32)

    def custom(q, kb, vb, lens):
        return buffer_attention_kernel(q, kb, vb, lens, scale)

    def sdpa(q, kb, vb, lens):
        out = mx.fast.scaled_dot_product_attention(q[:, :, None, :], kb[:, :, :ctx],
                                                   vb[:, :, :ctx], scale=scale)
        return out[:, :, 0, :]

    def oracle(q, kb, vb, lens):
        return reference(q, kb, vb, lens, scale)

    fmt = f"kv-buffers-{str(dtype).split('.')[-1]}"
    cls = f"H{nh}/{kvh}|dk{dk}|dv{dv}"
    return selection.use_custom("buffer_attention", fmt, cls, make_inputs, custom, sdpa, oracle,
                                _paged.SELF_TEST_TOL[dtype], margin=MARGIN)


def compile_cases():
    """Metal/CUDA compile-check cases (tests/test_metal_compile.py collects them)."""
    out = []
    for tag, nh, kvh, d in (("qwen3-128", 32, 8, 128), ("mha-64", 8, 8, 64),
                            ("g2-256", 8, 4, 256)):
        for dt in _paged.DTYPES:
            name = str(dt).split(".")[-1]
            big = 1 << 20
            t = _plan(dt, 4, nh, kvh, d, 1 << 16)[0]
            out.append((f"buffer-attn-{tag}-{name}", SPEC, [dt, dt, dt, mx.int32, mx.int32],
                        [big, big, big, 4, 8], [mx.float32, mx.float32], t))
            out.append((f"buffer-attn-one-{tag}-{name}", SPEC_ONE,
                        [dt, dt, dt, mx.int32, mx.int32], [big, big, big, 4, 8], [dt], t))
    return out
