"""Paged attention: the plain-MLX reference against float64 NumPy attention (CPU), the cache
scatter/gather, input errors, and (`-m gpu`) the custom kernel against the reference.

GPU run: `pytest -m gpu tests/test_paged_attention.py` (outputs NaN-poisoned before launch)."""

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import launch
from marlin_mlx.kernels import paged_attention as pa

import metal_emulator

GPU = launch.backend() is not None
needs_gpu = pytest.mark.skipif(not GPU, reason="needs an MLX GPU backend (Metal or CUDA)")

# (num_heads, num_kv_heads, k_dim, v_dim, mla)
SHAPES = {"mha": (4, 4, 64, 64, False), "gqa4": (8, 2, 128, 128, False),
          "gqa3-d256": (6, 2, 256, 256, False), "mla": (5, 1, 576, 512, True)}


def _to64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _make(rng, B, nh, kvh, dk, dv, mla, lens, bs=16, dtype=mx.float32, spare=5):
    """Caches with every sequence's blocks scattered at random over the pool."""
    mb = max(-(-n // bs) for n in lens) if max(lens) else 1
    nblocks = B * mb + spare
    kc = mx.array(rng.standard_normal((nblocks, kvh, bs, dk)).astype(np.float32)).astype(dtype)
    vc = None if mla else mx.array(
        rng.standard_normal((nblocks, kvh, bs, dv)).astype(np.float32)).astype(dtype)
    tables = rng.permutation(nblocks)[: B * mb].reshape(B, mb).astype(np.int32)
    q = mx.array(rng.standard_normal((B, nh, dk)).astype(np.float32)).astype(dtype)
    return q, kc, vc, mx.array(tables), mx.array(np.array(lens, dtype=np.int32))


def _attention64(q, kc, vc, tables, lens, scale, dv):
    """float64 attention, sequence by sequence, from the block tables."""
    q, k = _to64(q), _to64(kc)
    v = k[..., :dv] if vc is None else _to64(vc)
    B, nh, _ = q.shape
    kvh, bs = k.shape[1], k.shape[2]
    out = np.zeros((B, nh, dv))
    for b in range(B):
        n = int(lens[b])
        blocks = np.array(tables[b])[: -(-n // bs)]
        ks = np.concatenate([k[i] for i in blocks], axis=1)[:, :n]   # (kvh, n, dk)
        vs = np.concatenate([v[i] for i in blocks], axis=1)[:, :n]
        for h in range(nh):
            s = ks[h // (nh // kvh)] @ q[b, h] * scale
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ vs[h // (nh // kvh)]
    return out


def _rel(y, ref):
    return np.linalg.norm(_to64(y) - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_reference_matches_float64(shape):
    nh, kvh, dk, dv, mla = SHAPES[shape]
    rng = np.random.default_rng(list(SHAPES).index(shape))
    lens = [1, 15, 16, 17, 300]
    q, kc, vc, tables, cl = _make(rng, len(lens), nh, kvh, dk, dv, mla, lens)
    scale = dk ** -0.5
    y = pa.reference_paged_attention(q, kc, vc, tables, cl, scale, v_dim=dv if mla else None)
    assert y.shape == (len(lens), nh, dv) and y.dtype == mx.float32
    assert _rel(y, _attention64(q, kc, vc, tables, cl, scale, dv)) < 1e-5
    # the public op is the reference on the CPU backend
    if not GPU:
        z = pa.paged_attention(q, kc, vc, tables, cl, scale, v_dim=dv if mla else None)
        assert np.array_equal(np.array(z), np.array(y))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_reference_low_precision_dtype(dtype):
    rng = np.random.default_rng(3)
    q, kc, vc, tables, cl = _make(rng, 3, 8, 2, 64, 64, False, [5, 33, 70], dtype=dtype)
    y = pa.reference_paged_attention(q, kc, vc, tables, cl, 0.125)
    assert y.dtype == dtype
    assert _rel(y, _attention64(q, kc, vc, tables, cl, 0.125, 64)) < 1e-2


def test_write_gather_round_trip_and_decode_matches_sdpa():
    rng = np.random.default_rng(7)
    nb, kvh, bs, d, nh = 12, 2, 4, 32, 4
    kc = mx.zeros((nb, kvh, bs, d))
    vc = mx.zeros((nb, kvh, bs, d))
    table = mx.array([9, 2, 5, 11], dtype=mx.int32)
    n = 13  # 3 full blocks and one token
    keys = mx.array(rng.standard_normal((n, kvh, d)).astype(np.float32))
    vals = mx.array(rng.standard_normal((n, kvh, d)).astype(np.float32))
    pos = np.arange(n)
    slots = mx.array(np.array(table)[pos // bs] * bs + pos % bs, dtype=mx.int32)
    # written in two chunks (a prompt, then one decode token)
    kc2 = pa.write_paged(kc, keys[:12], slots[:12])
    kc2 = pa.write_paged(kc2, keys[12:], slots[12:])
    vc2 = pa.write_paged(vc, vals, slots)
    assert float(mx.abs(kc).sum()) == 0.0  # the input array is untouched
    g = pa.gather_paged(kc2, table, n)
    assert g.shape == (1, kvh, n, d)
    assert np.array_equal(np.array(g[0]), np.array(keys.transpose(1, 0, 2)))
    assert pa.gather_paged(kc2, table, 0).shape == (1, kvh, 0, d)
    # rows of blocks outside the table stay zero
    others = [i for i in range(nb) if i not in (9, 2, 5, 11)]
    assert float(mx.abs(kc2[mx.array(others)]).sum()) == 0.0
    # decode of the last token equals fused SDPA over the gathered keys and values
    q = mx.array(rng.standard_normal((1, nh, d)).astype(np.float32))
    y = pa.paged_attention(q, kc2, vc2, table[None], mx.array([n], dtype=mx.int32), d ** -0.5)
    ref = mx.fast.scaled_dot_product_attention(q[:, :, None], g, pa.gather_paged(vc2, table, n),
                                               scale=d ** -0.5)
    assert np.allclose(np.array(y), np.array(ref[:, :, 0]), atol=1e-5)


def test_write_with_a_slot_index_equals_the_slot_mapping():
    rng = np.random.default_rng(11)
    nb, kvh, bs, d = 6, 3, 4, 8
    cache = mx.array(rng.standard_normal((nb, kvh, bs, d)).astype(np.float32))
    slots = np.array([21, 3, 8, 9, 14], np.int32)
    entries = mx.array(rng.standard_normal((5, kvh, d)).astype(np.float32))
    by_slots = pa.write_paged(cache, entries, mx.array(slots))
    by_index = pa.write_paged(cache, entries, pa.SlotIndex(slots, bs, kvh))
    expect = np.array(cache).copy()
    expect[slots // bs, :, slots % bs] = np.array(entries)
    assert np.array_equal(np.array(by_slots), expect)
    assert np.array_equal(np.array(by_index), expect)
    with pytest.raises(ValueError, match="slot index built for block size"):
        pa.write_paged(cache, entries, pa.SlotIndex(slots, 8, kvh))
    with pytest.raises(ValueError, match="do not match"):
        pa.write_paged(cache, entries[:4], pa.SlotIndex(slots, bs, kvh))


def test_bad_inputs():
    rng = np.random.default_rng(0)
    q, kc, vc, tables, cl = _make(rng, 2, 8, 2, 64, 64, False, [5, 20])
    ok = dict(queries=q, key_cache=kc, value_cache=vc, block_tables=tables, context_lens=cl,
              scale=0.125)
    bad = [
        (dict(queries=q.astype(mx.float16)), "dtype"),
        (dict(queries=q[:, :7]), "multiple"),
        (dict(queries=q[..., :32]), "k_dim"),
        (dict(queries=q[0]), "queries"),
        (dict(key_cache=kc[0]), "key_cache"),
        (dict(key_cache=kc.astype(mx.int32), queries=q.astype(mx.int32)), "not supported"),
        (dict(value_cache=vc[:, :1]), "value_cache"),
        (dict(value_cache=vc.astype(mx.float16)), "dtype"),
        (dict(block_tables=tables.astype(mx.int64)), "int32"),
        (dict(block_tables=tables[0]), "block_tables"),
        (dict(context_lens=cl[:1]), "batch"),
        (dict(context_lens=cl.astype(mx.float32)), "int32"),
        (dict(scale=float("nan")), "scale"),
    ]
    for change, words in bad:
        with pytest.raises(ValueError, match=words):
            pa.paged_attention(**{**ok, **change})
    with pytest.raises(ValueError, match="v_dim"):
        pa.paged_attention(q, kc, vc, tables, cl, 0.125, v_dim=32)
    with pytest.raises(ValueError, match="v_dim"):
        pa.paged_attention(q, kc, None, tables, cl, 0.125, v_dim=65)
    with pytest.raises(ValueError, match="entries"):
        pa.write_paged(kc, mx.zeros((3, 2, 32)), mx.array([0, 1, 2], dtype=mx.int32))
    with pytest.raises(ValueError, match="int32"):
        pa.write_paged(kc, mx.zeros((3, 2, 64)), mx.array([0, 1, 2]).astype(mx.uint32))
    with pytest.raises(ValueError, match="exceeds"):
        pa.gather_paged(kc, tables[0], tables.shape[1] * 16 + 1)


def test_kernel_plan_fits_threadgroup_memory():
    # the compile cases cover every supported head layout; their threadgroup arrays fit 32 KiB
    for nh, kvh, dk, dv in ((32, 8, 128, 128), (20, 1, 576, 512), (64, 4, 256, 256),
                            (8, 8, 64, 64), (40, 1, 576, 512)):
        gc = pa._heads_per_group(nh // kvh, dk, dv)
        rows = pa.NT // (dv // 4)
        floats = gc * max(dk, rows * dv) + gc * pa.NT + 2 * (pa.NT // 32) * gc + pa.NT
        assert 1 <= gc <= nh // kvh and floats * 4 <= 32 * 1024


# ----------------------------------------------------------------------------- GPU kernel

TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}


GPU_SHAPES = {"qwen3-8b": (32, 8, 128, 128, False), "h64": (8, 8, 64, 64, False),
              "h256-gqa2": (8, 4, 256, 256, False), "glm-mla": (20, 1, 576, 512, True)}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32],
                         ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_kernel_matches_reference(shape, dtype, poison):
    nh, kvh, dk, dv, mla = GPU_SHAPES[shape]
    rng = np.random.default_rng(np.random.randint(1 << 30))
    lens = [1, 15, 16, 17, 300, 127, 128, 129, 4100]
    q, kc, vc, tables, cl = _make(rng, len(lens), nh, kvh, dk, dv, mla, lens, dtype=dtype)
    scale = dk ** -0.5
    y = pa.paged_attention_kernel(q, kc, vc, tables, cl, scale, dv)
    ref = pa.reference_paged_attention(q, kc, vc, tables, cl, scale, v_dim=dv)
    assert y.shape == ref.shape and y.dtype == dtype
    y64 = _to64(y)
    assert np.isfinite(y64).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    ref64 = _attention64(q, kc, vc, tables, cl, scale, dv)
    assert _rel(y, ref64) < TOL[dtype]
    assert _rel(ref, ref64) < TOL[dtype]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_kernel_with_the_mla_cache_blocks_of_256(dtype, poison):
    # models/mla_cache.py reads its contiguous buffer as blocks of its growth step (256 tokens)
    nh, kvh, dk, dv, mla = GPU_SHAPES["glm-mla"]
    rng = np.random.default_rng(np.random.randint(1 << 30))
    lens = [1, 255, 256, 257, 3000, 17000]  # 17000: more partitions than reduce threads
    q, kc, _, tables, cl = _make(rng, len(lens), nh, kvh, dk, dv, mla, lens, bs=256, dtype=dtype)
    y = pa.paged_attention_kernel(q, kc, None, tables, cl, 0.07, dv)
    y64 = _to64(y)
    assert np.isfinite(y64).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    assert _rel(y, _attention64(q, kc, None, tables, cl, 0.07, dv)) < TOL[dtype]


@pytest.mark.gpu
@needs_gpu
def test_kernel_empty_context_and_padding_blocks(poison):
    rng = np.random.default_rng(11)
    q, kc, vc, tables, cl = _make(rng, 3, 8, 2, 128, 128, False, [1, 600, 40], dtype=mx.float16)
    y = pa.paged_attention_kernel(q, kc, vc, tables, mx.array([0, 600, 40], dtype=mx.int32),
                                  0.1, 128)
    ref = _attention64(q, kc, vc, tables, cl, 0.1, 128)
    assert float(mx.abs(y[0]).max()) == 0.0  # context 0: zeros, not NaN
    assert np.linalg.norm(_to64(y[1:]) - ref[1:]) / np.linalg.norm(ref[1:]) < TOL[mx.float16]


@pytest.mark.gpu
@needs_gpu
def test_dispatch_self_test_keeps_a_correct_path(monkeypatch, tmp_path):
    monkeypatch.setenv("MARLIN_MLX_CACHE_DIR", str(tmp_path))
    from marlin_mlx.kernels import selection
    selection.clear(memory_only=True)
    pa._DECISIONS.clear()
    rng = np.random.default_rng(5)
    q, kc, vc, tables, cl = _make(rng, 4, 32, 8, 128, 128, False, [3, 200, 511, 1000],
                                  dtype=mx.bfloat16)
    y = pa.paged_attention(q, kc, vc, tables, cl, 128 ** -0.5)
    rec = [v for k, v in selection.choices().items() if "paged_attention" in k]
    assert rec and rec[0]["self_test"] == "pass", rec
    ref = _attention64(q, kc, vc, tables, cl, 128 ** -0.5, 128)
    assert _rel(y, ref) < TOL[mx.bfloat16]


# ----------------------------------------------------------------------------- CPU emulation

EMU_CASES = {"gqa4-f16": ((8, 2, 64, 64, False), mx.float16, [1, 15, 16, 17, 300, 0]),
             "mla-bf16": ((10, 1, 576, 512, True), mx.bfloat16, [1, 129]),
             "d128-f32-g8": ((16, 2, 128, 128, False), mx.float32, [129, 5])}


@pytest.mark.skipif(not metal_emulator.available(), reason="needs g++ with C++20 <barrier>")
@pytest.mark.parametrize("case", list(EMU_CASES), ids=list(EMU_CASES))
def test_kernel_body_on_cpu_emulator(case, tmp_path):
    """The kernel pair's Metal rendering, compiled by g++ and run with one CPU thread per GPU
    thread (tests/metal_emulator.py): index arithmetic, barriers, simdgroup reductions, partition
    combination and empty contexts, checked against float64 attention without a GPU."""
    (nh, kvh, dk, dv, mla), dtype, lens = EMU_CASES[case]
    rng = np.random.default_rng(list(EMU_CASES).index(case))
    q, kc, vc, tables, cl = _make(rng, len(lens), nh, kvh, dk, dv, mla, lens, dtype=dtype,
                                  spare=2)
    B, mb, scale = len(lens), tables.shape[1], dk ** -0.5
    plan = pa._plan(dtype, B, nh, kvh, 16, dk, dv, mb, mla)
    _emulate_and_check(pa.SPEC, [q, kc, kc if mla else vc, tables, cl], plan,
                       pa._meta(mb, plan[-1], scale), q, kc, vc, tables, cl, scale, dv, lens,
                       dtype, tmp_path)

def _emulate_and_check(first, first_inputs, plan, meta, q, kc, vc, tables, cl, scale, dv, lens,
                       dtype, tmp_path):
    """Run a first pass and the reduce on the CPU emulator; check against float64 attention
    (and zeros for empty contexts)."""
    (t, grid, tg, oshapes, odts, rt, rgrid, rtg, _) = plan
    B, nh = q.shape[:2]
    y = metal_emulator.emulate([
        dict(spec=first, inputs=first_inputs + [meta], template=t, grid=grid, threadgroup=tg,
             output_shapes=oshapes, output_dtypes=odts),
        dict(spec=pa.REDUCE_SPEC, inputs=[("out", 0, 0), ("out", 0, 1), meta], template=rt,
             grid=rgrid, threadgroup=rtg, output_shapes=[(B, nh, dv)], output_dtypes=[dtype]),
    ], tmp_path)[0]
    y64 = _to64(y)
    assert np.isfinite(y64).all(), "unwritten (NaN-filled) outputs"
    nz = [i for i, n in enumerate(lens) if n > 0]
    sel = mx.array(nz)
    ref = _attention64(q[sel], kc, vc, tables[sel], cl[sel], scale, dv)
    err = np.linalg.norm(y64[nz] - ref) / np.linalg.norm(ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"
    for i, n in enumerate(lens):
        if n == 0:
            assert np.abs(y64[i]).max() == 0.0


# MLA first pass (src/paged_mla.h): one latent "kv head", many query heads, several partitions
# and head chunks per sequence. (num_heads, k_dim, v_dim), dtype, context lengths, block size
MLA_EMU_CASES = {"glm-bf16": ((10, 576, 512), mx.bfloat16, [1, 129, 300, 0], 16),
                 "f32-small": ((6, 96, 64), mx.float32, [33, 7, 200], 16),
                 "f16-blocks256": ((5, 576, 512), mx.float16, [255, 40], 256)}


@pytest.mark.skipif(not metal_emulator.available(), reason="needs g++ with C++20 <barrier>")
@pytest.mark.parametrize("case", list(MLA_EMU_CASES), ids=list(MLA_EMU_CASES))
def test_mla_first_pass_on_cpu_emulator(case, tmp_path, monkeypatch):
    (nh, dk, dv), dtype, lens, bs = MLA_EMU_CASES[case]
    monkeypatch.setattr(pa, "HEADS_CAP", 4)  # several head chunks, the last one short
    rng = np.random.default_rng(100 + list(MLA_EMU_CASES).index(case))
    q, kc, _, tables, cl = _make(rng, len(lens), nh, 1, dk, dv, True, lens, bs=bs,
                                 dtype=dtype, spare=2)
    B, mb, scale = len(lens), tables.shape[1], 0.3 * dk ** -0.5
    assert pa._mla_supported(dtype, 1, dk, dv)
    plan = pa._plan_mla(dtype, B, nh, bs, dk, dv, mb)
    tmpl, np_ = dict(plan[0]), plan[-1]
    assert np_ > 1 and tmpl["NHC"] > 1 and tmpl["NTOK"] % (pa.MLA_THREADS // tmpl["LPT"]) == 0
    _emulate_and_check(pa.MLA_SPEC, [q, kc, tables, cl], plan, pa._meta(mb, np_, scale), q, kc,
                       None, tables, cl, scale, dv, lens, dtype, tmp_path)
