"""Paged attention: the decode op of the serving engine's block-pooled KV cache.

Layouts:
  key_cache:   (num_blocks, num_kv_heads, block_size, k_dim)
  value_cache: (num_blocks, num_kv_heads, block_size, v_dim), or None for an MLA latent cache,
               whose values are the first v_dim columns of key_cache (GLM-4.7-Flash: one kv
               head, k_dim = kv_lora_rank + rope = 576, v_dim = 512)
  slot = block_id * block_size + position_in_block
  block_tables: (B, max_blocks) int32, a sequence's blocks in order (unused entries: any valid
               id, e.g. 0); context_lens: (B,) int32, the tokens each sequence attends to
               (1 <= context_len <= max_blocks * block_size; larger values are clamped by the
               kernel, 0 gives zeros from the kernel and NaN from the reference).
  GQA: query head j reads kv head j // (num_heads // num_kv_heads).

`write_paged` scatters new rows into a cache, `gather_paged` reads sequences back as a
contiguous (S, heads, length, dim) array (for prefill chunks through MLX's fused SDPA), and
`paged_attention` is the decode step: one query token per sequence against its cached context.
On the CPU backend it runs `reference_paged_attention` (plain MLX, float32 softmax); on a GPU
the custom kernel (body: src/paged_attention.h, partial results combined by
src/paged_attention_reduce.h) when the measured selection keeps it (kernels/selection.py:
first-use self-test against the reference and timing against it; MARLIN_MLX_KERNELS forces
either path).

Kernel layout (split-K over the context, "flash decoding"): one threadgroup of NT threads per
(context partition of NT tokens, sequence, kv head, chunk of its query heads). Each thread owns
one token: it reads the token's key row with 16-byte loads and scores it against all the
group's query heads (held in threadgroup memory, pre-scaled), so every key load serves the whole
GQA group. A float32 softmax over the partition follows (simdgroup max/sum), then the threads
re-split over (token subsets, 4-column slices of v) to accumulate p @ V for all heads of the
group. Each partition writes an unnormalised float32 output plus its (max, sum); the reduce
kernel rescales and combines the partitions and casts to the query dtype.
"""

from __future__ import annotations

import math
import os
import struct
import warnings

import mlx.core as mx
import numpy as np

from . import selection
from .launch import KernelSpec, backend, cdiv, launch

DTYPES = (mx.float16, mx.bfloat16, mx.float32)
XKIND = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
NT = 128                      # threads per threadgroup = tokens per context partition
SMEM_BUDGET = 30 * 1024       # bytes of threadgroup memory (Metal allows 32 KiB)
MAX_V_DIM = 4 * NT            # the p @ V phase gives each thread 4 columns of one row
LOG2E = 1.4426950408889634
# At most this many query heads per threadgroup (MARLIN_MLX_PAGED_HEADS; 0: as many as fit).
# Fewer heads per group spread a batch-1 decode (GLM: 20 heads on one latent "kv head") over
# more SMs, at the cost of reading each key row once per group. GLM-4.7-Flash batch-1 decode on
# the H200 (decode_probe --compiled, -hN variants): 10 heads (as many as fit) 73.7 / 89.1
# tok/s at prompts 128 / 8192, 4 heads 82.7 / 93.5, 2 heads 81.1 / 57.4.
def _heads_cap_env(default: int = 4) -> int:
    raw = os.environ.get("MARLIN_MLX_PAGED_HEADS", "").strip()
    if not raw:
        return default
    if raw.isdigit():
        return int(raw)
    warnings.warn(f"MARLIN_MLX_PAGED_HEADS={raw!r} is not a count of heads; using {default}")
    return default


HEADS_CAP = _heads_cap_env()

SPEC = KernelSpec("marlin_paged_attn", "paged_attention.h",
                  ("queries", "key_cache", "value_cache", "block_tables", "context_lens", "meta"),
                  ("part_o", "part_ml"))
MLA_SPEC = KernelSpec("marlin_paged_mla", "paged_mla.h",
                      ("queries", "cache", "block_tables", "context_lens", "meta"),
                      ("part_o", "part_ml"))
REDUCE_SPEC = KernelSpec("marlin_paged_attn_reduce", "paged_attention_reduce.h",
                         ("part_o", "part_ml", "meta"), ("out",))
SELF_TEST_TOL = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 1.5e-2}


# --------------------------------------------------------------------------- cache access

def _check_cache(cache, name="cache"):
    if not isinstance(cache, mx.array) or cache.ndim != 4:
        raise ValueError(f"{name}: expected a (num_blocks, num_kv_heads, block_size, dim) array, "
                         f"got shape {getattr(cache, 'shape', None)}")
    if cache.dtype not in DTYPES:
        raise ValueError(f"{name}: dtype {cache.dtype} not supported (float16, bfloat16, float32)")


def _check_index(a, name, ndim):
    if not isinstance(a, mx.array) or a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d int32 array, got shape "
                         f"{getattr(a, 'shape', None)}")
    if a.dtype != mx.int32:
        raise ValueError(f"{name}: expected int32, got {a.dtype}")


class SlotIndex:
    """Where T new tokens go in a (num_blocks, num_kv_heads, block_size, dim) cache, as the
    int64 index arrays of one scatter: block (T, 1), kv head (1, H), position in block (T, 1).
    Built once per step from the host's slot mapping and shared by every layer's write, so a
    write is one scatter launch instead of that plus divisions, an arange and index casts."""

    def __init__(self, slot_mapping, block_size: int, num_kv_heads: int):
        slots = np.asarray(slot_mapping, dtype=np.int64).reshape(-1)
        self.size, self.block_size, self.num_kv_heads = slots.shape[0], block_size, num_kv_heads
        self.blocks = mx.array((slots // block_size)[:, None])
        self.heads = mx.array(np.arange(num_kv_heads, dtype=np.int64)[None, :])
        self.offsets = mx.array((slots % block_size)[:, None])


def write_paged(cache: mx.array, entries: mx.array, slot_mapping) -> mx.array:
    """The cache with entries[t] written at slot slot_mapping[t] (for every kv head).

    entries (T, num_kv_heads, dim); slot_mapping (T,) int32, or a SlotIndex of T slots for this
    cache's block size and heads. The returned array replaces the old one; the caller's `cache`
    object is left as it was, and MLX reuses its buffer in place when nothing else holds it by
    the time the graph runs."""
    _check_cache(cache)
    nb, h, bs, d = cache.shape
    if isinstance(slot_mapping, SlotIndex):
        index = slot_mapping
        if (index.block_size, index.num_kv_heads) != (bs, h):
            raise ValueError(f"write_paged: slot index built for block size {index.block_size} "
                             f"and {index.num_kv_heads} heads, cache has {bs} and {h}")
        T = index.size
    else:
        _check_index(slot_mapping, "slot_mapping", 1)
        index, T = None, slot_mapping.shape[0]
    if entries.ndim != 3 or entries.shape[1:] != (h, d) or entries.shape[0] != T:
        raise ValueError(f"write_paged: entries {tuple(entries.shape)} do not match "
                         f"(T={T}, num_kv_heads={h}, dim={d})")
    out = mx.array(cache)  # a new handle on the same graph node: the scatter rebinds only it
    if index is not None:
        out[index.blocks, index.heads, index.offsets] = entries.astype(cache.dtype)
    else:
        out[slot_mapping // bs, :, slot_mapping % bs] = entries.astype(cache.dtype)
    return out


def gather_paged(cache: mx.array, block_table: mx.array, length: int) -> mx.array:
    """The first `length` rows of sequences, contiguous: a block table (max_blocks,) gives
    (1, num_kv_heads, length, dim); a batch of tables (S, max_blocks) gives
    (S, num_kv_heads, length, dim) (a packed prefill step's rows)."""
    _check_cache(cache)
    if not isinstance(block_table, mx.array) or block_table.ndim not in (1, 2):
        raise ValueError("block_table: expected a (max_blocks,) or (S, max_blocks) int32 array, "
                         f"got shape {getattr(block_table, 'shape', None)}")
    _check_index(block_table, "block_table", block_table.ndim)
    tables = block_table if block_table.ndim == 2 else block_table[None]
    nb, h, bs, d = cache.shape
    length = int(length)
    if not 0 <= length <= tables.shape[1] * bs:
        raise ValueError(f"gather_paged: length {length} exceeds the {tables.shape[1]} "
                         f"blocks of {bs} tokens in the block table")
    n = cdiv(length, bs)
    rows = cache[tables[:, :n]]                         # (S, n, h, bs, d)
    rows = rows.transpose(0, 2, 1, 3, 4).reshape(tables.shape[0], h, n * bs, d)
    return rows[:, :, :length]


# --------------------------------------------------------------------------- attention

def _validate(queries, key_cache, value_cache, block_tables, context_lens, scale, v_dim):
    """Checks shapes and dtypes; returns (B, num_heads, kv_heads, block_size, k_dim, v_dim)."""
    _check_cache(key_cache, "key_cache")
    if not isinstance(queries, mx.array) or queries.ndim != 3:
        raise ValueError(f"queries: expected (B, num_heads, k_dim), got shape "
                         f"{getattr(queries, 'shape', None)}")
    if queries.dtype != key_cache.dtype:
        raise ValueError(f"queries dtype {queries.dtype} differs from the cache's {key_cache.dtype}")
    nb, kvh, bs, dk = key_cache.shape
    B, nh, qdk = queries.shape
    if qdk != dk:
        raise ValueError(f"queries have k_dim {qdk}, key_cache has {dk}")
    if nh % kvh != 0:
        raise ValueError(f"num_heads {nh} is not a multiple of num_kv_heads {kvh}")
    if value_cache is None:
        dv = dk if v_dim is None else int(v_dim)
        if not 0 < dv <= dk:
            raise ValueError(f"v_dim {dv}: the latent values must be the first columns of the "
                             f"{dk}-wide key rows")
    else:
        _check_cache(value_cache, "value_cache")
        if value_cache.dtype != key_cache.dtype:
            raise ValueError(f"value_cache dtype {value_cache.dtype} differs from key_cache's "
                             f"{key_cache.dtype}")
        if value_cache.shape[:3] != key_cache.shape[:3]:
            raise ValueError(f"value_cache {tuple(value_cache.shape)} and key_cache "
                             f"{tuple(key_cache.shape)} differ in blocks, heads or block size")
        dv = value_cache.shape[3]
        if v_dim is not None and int(v_dim) != dv:
            raise ValueError(f"v_dim {v_dim} differs from value_cache's {dv}")
    _check_index(block_tables, "block_tables", 2)
    _check_index(context_lens, "context_lens", 1)
    if block_tables.shape[0] != B or context_lens.shape[0] != B:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / context_lens "
                         f"{tuple(context_lens.shape)} do not match the batch of {B} queries")
    if block_tables.shape[1] < 1:
        raise ValueError("block_tables: need at least one block per sequence")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return B, nh, kvh, bs, dk, dv


def reference_paged_attention(queries, key_cache, value_cache, block_tables, context_lens, scale,
                              *, v_dim=None):
    """Plain MLX ops, float32 throughout: the oracle and the CPU path."""
    B, nh, kvh, bs, dk, dv = _validate(queries, key_cache, value_cache, block_tables,
                                       context_lens, scale, v_dim)
    return _reference(queries, key_cache, value_cache, block_tables, context_lens, scale, dv)


def _reference(queries, key_cache, value_cache, block_tables, context_lens, scale, dv):
    B, nh, dk = queries.shape
    kvh, bs = key_cache.shape[1], key_cache.shape[2]
    mb = block_tables.shape[1]
    g = nh // kvh

    def seqs(cache):  # (B, kvh, mb * bs, dim) float32
        x = cache[block_tables]                                  # (B, mb, kvh, bs, dim)
        x = x.transpose(0, 2, 1, 3, 4).reshape(B, kvh, mb * bs, cache.shape[3])
        return x.astype(mx.float32)

    k = seqs(key_cache)
    v = k[..., :dv] if value_cache is None else seqs(value_cache)
    q = queries.astype(mx.float32).reshape(B, kvh, g, dk)
    s = (q * scale) @ k.swapaxes(-1, -2)                          # (B, kvh, g, L)
    pos = mx.arange(mb * bs, dtype=mx.int32)
    mask = pos[None, :] < context_lens[:, None]                   # (B, L)
    s = mx.where(mask[:, None, None, :], s, -float("inf"))
    p = mx.softmax(s, axis=-1)
    o = p @ v                                                     # (B, kvh, g, dv)
    return o.reshape(B, nh, dv).astype(queries.dtype)


def paged_attention(queries, key_cache, value_cache, block_tables, context_lens, scale, *,
                    v_dim=None, validate: bool = True):
    """Decode attention over a paged cache: (B, num_heads, v_dim) in the queries' dtype.

    queries (B, num_heads, k_dim), one token per sequence, already written into the cache.
    validate=False skips the input checks (a caller that built the inputs itself saves their
    host time on every layer of every decode step)."""
    if validate:
        B, nh, kvh, bs, dk, dv = _validate(queries, key_cache, value_cache, block_tables,
                                           context_lens, scale, v_dim)
    else:
        nh, (kvh, bs, dk) = queries.shape[1], key_cache.shape[1:]
        dv = (dk if v_dim is None else v_dim) if value_cache is None else value_cache.shape[3]
    if backend() is not None and _use_kernel(queries.dtype, nh, kvh, bs, dk, dv,
                                             value_cache is None):
        return paged_attention_kernel(queries, key_cache, value_cache, block_tables,
                                      context_lens, scale, dv)
    return _reference(queries, key_cache, value_cache, block_tables, context_lens, scale, dv)


# --------------------------------------------------------------------------- the kernel

def supported(dtype, nh, kvh, bs, dk, dv, mla=False) -> bool:
    """Whether the custom kernels cover these shapes (else the reference runs)."""
    if mla and dtype in DTYPES and _mla_supported(dtype, kvh, dk, dv):
        return True  # an MLA latent cache (one kv head) may take the MLA first pass
    return (dtype in DTYPES and dk % 32 == 0 and dv % 4 == 0 and 0 < dv <= MAX_V_DIM
            and nh % kvh == 0 and _heads_per_group(nh // kvh, dk, dv) >= 1)


def _heads_per_group(g: int, dk: int, dv: int) -> int:
    """Query heads one threadgroup takes (balanced chunks within the threadgroup-memory budget):
    the pre-scaled queries (or, reused later, the p @ V partial sums) plus the probabilities."""
    rows = max(1, NT // (dv // 4))
    per_head = 4 * (max(dk, rows * dv) + NT + 2 * (NT // 32))
    fixed = 4 * NT  # row offsets of the partition's tokens
    gmax = (SMEM_BUDGET - fixed) // per_head
    if gmax < 1:
        return 0
    return cdiv(g, cdiv(g, gmax))


_PLANS: dict = {}
_METAS: dict = {}


def _plan(dtype, B, nh, kvh, bs, dk, dv, mb, mla, whole=False):
    """Launch plan; `whole`: block size `bs` read at run time (template BS = 0)."""
    key = (dtype, B, nh, kvh, bs, dk, dv, mb, mla, whole)
    plan = _PLANS.get(key)
    if plan is None:
        g = nh // kvh
        gc = _heads_per_group(g, dk, dv)
        if HEADS_CAP > 0:
            gc = cdiv(g, cdiv(g, min(gc, HEADS_CAP)))
        nhc = cdiv(g, gc)
        np_ = cdiv(mb * bs, NT)
        template = [("T", dtype), ("XK", XKIND[dtype]), ("DK", dk), ("DV", dv),
                    ("VS", dk if mla else dv), ("BS", 0 if whole else bs), ("KVH", kvh),
                    ("G", g), ("GC", gc), ("NHC", nhc), ("NT", NT)]
        ch = cdiv(dv, NT)  # the reduce's column chunks
        rtemplate = [("T", dtype), ("DV", dv), ("NT", NT), ("CH", ch)]
        plan = _PLANS[key] = (
            template, (NT * np_, B * kvh * nhc, 1), (NT, 1, 1),
            [(B, nh, np_, dv), (B, nh, np_, 2)], [mx.float32, mx.float32],
            rtemplate, (NT * B * nh * ch, 1, 1), (NT, 1, 1), np_)
    return plan


MLA_THREADS = 256            # threads per threadgroup of the MLA first pass
MLA_LANES_PER_TOKEN = 8      # lanes that share one latent row's score (a butterfly of 3 steps)
MLA_TOKENS = (128, 64, 32)   # partition sizes, largest first
MLA_TARGET_TGS = 264         # threadgroups to aim for: two per SM of the H200's 132


def _mla_layout(B, nh, dk, capacity):
    """(tokens per partition, heads per chunk, chunks) of the MLA first pass: the largest
    partition that still gives MLA_TARGET_TGS threadgroups (else the smallest), at most
    HEADS_CAP heads per chunk (as many as fit when 0) in balanced chunks."""
    for ntok in MLA_TOKENS:
        gmax = (SMEM_BUDGET - 4 * ntok) // (4 * (dk + ntok))
        if HEADS_CAP > 0:
            gmax = min(gmax, HEADS_CAP)
        if gmax < 1:
            return None
        nhc = cdiv(nh, gmax)
        if B * nhc * cdiv(capacity, ntok) >= MLA_TARGET_TGS:
            break
    return ntok, cdiv(nh, nhc), nhc


def _mla_supported(dtype, kvh, dk, dv) -> bool:
    return (kvh == 1 and dk % (4 if dtype == mx.float32 else 8) == 0 and dv % 2 == 0
            and dv <= dk and _mla_layout(1, 1, dk, 1) is not None)


def _plan_mla(dtype, B, nh, bs, dk, dv, mb):
    key = ("mla", dtype, B, nh, bs, dk, dv, mb, HEADS_CAP)
    plan = _PLANS.get(key)
    if plan is None:
        ntok, gc, nhc = _mla_layout(B, nh, dk, mb * bs)
        np_ = cdiv(mb * bs, ntok)
        template = [("T", dtype), ("XK", XKIND[dtype]), ("DK", dk), ("DV", dv), ("BS", bs),
                    ("NH", nh), ("GC", gc), ("NHC", nhc), ("NTOK", ntok),
                    ("LPT", MLA_LANES_PER_TOKEN), ("NTH", MLA_THREADS)]
        ch = cdiv(dv, NT)
        rtemplate = [("T", dtype), ("DV", dv), ("NT", NT), ("CH", ch)]
        plan = _PLANS[key] = (
            template, (MLA_THREADS * np_, B * nhc, 1), (MLA_THREADS, 1, 1),
            [(B, nh, np_, dv), (B, nh, np_, 2)], [mx.float32, mx.float32],
            rtemplate, (NT * B * nh * ch, 1, 1), (NT, 1, 1), np_)
    return plan


def _meta(mb, np_, scale, bs=0):
    """[max_blocks, partitions, bits of scale * log2(e), run-time block size] as int32 (cached:
    no per-call array)."""
    key = (mb, np_, float(scale), bs)
    m = _METAS.get(key)
    if m is None:
        if len(_METAS) > 256:  # a growing buffer makes one per capacity
            _METAS.clear()
        bits = struct.unpack("<i", struct.pack("<f", float(scale) * LOG2E))[0]
        m = _METAS[key] = mx.array([mb, np_, bits, bs, 0, 0, 0, 0], dtype=mx.int32)
    return m


def paged_attention_kernel(queries, key_cache, value_cache, block_tables, context_lens, scale,
                           v_dim, whole_buffers=False):
    """The custom kernel pair alone (no validation, no fallback). `whole_buffers`: each block is
    a whole KVCache buffer, its size read at run time (kernels/buffer_attention.py's fallback
    for heads its own kernel does not cover)."""
    B, nh, dk = queries.shape
    _, kvh, bs, _ = key_cache.shape
    mb = block_tables.shape[1]
    mla = value_cache is None
    if whole_buffers:
        (template, grid, tg, oshapes, odts, rtemplate, rgrid, rtg, np_) = _plan(
            queries.dtype, B, nh, kvh, bs, dk, v_dim, mb, mla, True)
        spec, inputs = SPEC, [queries, key_cache, value_cache, block_tables, context_lens]
        meta = _meta(mb, np_, scale, bs)
    elif mla and _mla_supported(queries.dtype, kvh, dk, v_dim):
        (template, grid, tg, oshapes, odts, rtemplate, rgrid, rtg, np_) = _plan_mla(
            queries.dtype, B, nh, bs, dk, v_dim, mb)
        spec, inputs = MLA_SPEC, [queries, key_cache, block_tables, context_lens]
    else:
        (template, grid, tg, oshapes, odts, rtemplate, rgrid, rtg, np_) = _plan(
            queries.dtype, B, nh, kvh, bs, dk, v_dim, mb, mla)
        spec = SPEC
        inputs = [queries, key_cache, key_cache if mla else value_cache, block_tables,
                  context_lens]
    if not whole_buffers:
        meta = _meta(mb, np_, scale)
    part_o, part_ml = launch(spec, inputs + [meta], template, grid, tg, oshapes, odts)
    return launch(REDUCE_SPEC, [part_o, part_ml, meta], rtemplate, rgrid, rtg,
                  [(B, nh, v_dim)], [queries.dtype])[0]


_DECISIONS: dict = {}


def _use_kernel(dtype, nh, kvh, bs, dk, dv, mla) -> bool:
    key = (dtype, nh, kvh, bs, dk, dv, mla, selection.mode())
    use = _DECISIONS.get(key)
    if use is None:
        use = _DECISIONS[key] = _decide(dtype, nh, kvh, bs, dk, dv, mla)
    return use


def _decide(dtype, nh, kvh, bs, dk, dv, mla) -> bool:
    if not supported(dtype, nh, kvh, bs, dk, dv, mla):
        return False
    fmt = f"{'mla' if mla else 'kv'}-{str(dtype).split('.')[-1]}"
    cls = f"H{nh}/{kvh}|dk{dk}|dv{dv}|bs{bs}"
    B, ctx = 8, 1000           # a representative decode batch, odd context lengths

    def make_inputs():
        mb = cdiv(ctx, bs)
        nblocks = B * mb + 3
        kc = mx.random.normal((nblocks, kvh, bs, dk)).astype(dtype)
        vc = kc if mla else mx.random.normal((nblocks, kvh, bs, dv)).astype(dtype)
        tables = mx.random.permutation(nblocks)[: B * mb].reshape(B, mb).astype(mx.int32)
        lens = mx.random.randint(1, ctx + 1, (B,)).astype(mx.int32)
        q = mx.random.normal((B, nh, dk)).astype(dtype)
        return q, kc, vc, tables, lens

    def custom(q, kc, vc, tables, lens):
        return paged_attention_kernel(q, kc, None if mla else vc, tables, lens, dk ** -0.5, dv)

    def reference(q, kc, vc, tables, lens):
        return _reference(q, kc, None if mla else vc, tables, lens, dk ** -0.5, dv)

    return selection.use_custom("paged_attention", fmt, cls, make_inputs, custom, reference,
                                reference, SELF_TEST_TOL[dtype])


def template_for(dtype, B, nh, kvh, bs, dk, dv, mb, mla):
    """(kernel template, reduce template) a launch would use (for the compile checks)."""
    plan = _plan(dtype, B, nh, kvh, bs, dk, dv, mb, mla)
    return plan[0], plan[5]


def compile_cases():
    """Metal/CUDA compile-check cases (tests/test_metal_compile.py collects them)."""
    out = []
    shapes = [("qwen3-128", 32, 8, 128, 128, False), ("h64", 8, 8, 64, 64, False),
              ("h256", 16, 4, 256, 256, False), ("mla", 20, 1, 576, 512, True)]
    for tag, nh, kvh, dk, dv, mla in shapes:
        for dt in DTYPES:
            name = str(dt).split(".")[-1]
            t, rt = template_for(dt, 4, nh, kvh, 16, dk, dv, 64, mla)
            big = 1 << 20
            out.append((f"paged-attn-{tag}-{name}", SPEC, [dt, dt, dt, mx.int32, mx.int32,
                                                            mx.int32],
                        [big, big, big, 256, 8, 8], [mx.float32, mx.float32], t))
            if not mla:  # block size read at run time (KVCache buffers, buffer_attention.py)
                out.append((f"paged-attn-whole-{tag}-{name}", SPEC,
                            [dt, dt, dt, mx.int32, mx.int32, mx.int32],
                            [big, big, big, 4, 8, 8], [mx.float32, mx.float32],
                            _plan(dt, 4, nh, kvh, 1024, dk, dv, 1, False, True)[0]))
            out.append((f"paged-attn-reduce-{tag}-{name}", REDUCE_SPEC,
                        [mx.float32, mx.float32, mx.int32], [big, big, 8], [dt], rt))
            if mla:  # the MLA first pass, short (small partitions) and long contexts
                for mb in (1, 64):
                    t = _plan_mla(dt, 1, nh, 256, dk, dv, mb)[0]
                    out.append((f"paged-mla-{mb * 256}-{name}", MLA_SPEC,
                                [dt, dt, mx.int32, mx.int32, mx.int32], [big, big, 256, 8, 8],
                                [mx.float32, mx.float32], t))
    return out
