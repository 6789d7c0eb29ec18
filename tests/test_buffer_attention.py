"""Decode attention over KVCache buffers (kernels/buffer_attention.py): its kernel and the paged
kernel's whole-buffer fallback on the CPU emulator (CI) and (`-m gpu`) on a GPU, against
float64 attention, with outputs NaN-poisoned before launch on the GPU."""

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import buffer_attention as ba
from marlin_mlx.kernels import launch
from marlin_mlx.kernels import paged_attention as pa

import metal_emulator

GPU = launch.backend() is not None
needs_gpu = pytest.mark.skipif(not GPU, reason="needs an MLX GPU backend (Metal or CUDA)")
needs_emulator = pytest.mark.skipif(not metal_emulator.available(),
                                    reason="needs g++ with C++20 <barrier>")
TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}


def _to64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _case(rng, nh, kvh, d, cap, lens, dtype):
    B = len(lens)

    def rand(shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    return (rand((B, nh, d)), rand((B, kvh, cap, d)), rand((B, kvh, cap, d)),
            mx.array(np.array(lens, dtype=np.int32)))


def _attention64(q, kb, vb, lens, scale):
    """float64 attention of each sequence over its first lens[b] rows."""
    q, k, v = _to64(q), _to64(kb), _to64(vb)
    B, nh, d = q.shape
    g = nh // k.shape[1]
    out = np.zeros((B, nh, d))
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        for h in range(nh):
            s = k[b, h // g, :n] @ q[b, h] * scale
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[b, h // g, :n]
    return out


def _rel(y, ref):
    return np.linalg.norm(_to64(y) - ref) / np.linalg.norm(ref)


def test_reference_matches_float64_and_sdpa():
    rng = np.random.default_rng(0)
    q, kb, vb, lens = _case(rng, 8, 2, 64, 40, [33, 33], mx.float32)
    y = ba.reference(q, kb, vb, lens, 0.125)
    assert _rel(y, _attention64(q, kb, vb, lens, 0.125)) < 1e-5
    sdpa = mx.fast.scaled_dot_product_attention(q[:, :, None], kb[:, :, :33], vb[:, :, :33],
                                                scale=0.125)[:, :, 0]
    assert mx.allclose(y, sdpa, atol=1e-5).item()


def test_coverage():
    # the kernel takes 64/128/256-wide heads with at most 32 query values per lane and its
    # threadgroup memory in budget; others go to the paged kernel over whole buffers
    assert ba.fits(mx.bfloat16, 32, 8, 128, 128) and ba.fits(mx.float32, 8, 8, 64, 64)
    assert ba.fits(mx.float16, 8, 4, 256, 256)           # 2 heads x 8 columns
    assert not ba.fits(mx.float16, 16, 4, 256, 256)      # 4 heads x 256 x 8 warps: 33 KB
    assert not ba.fits(mx.bfloat16, 32, 2, 128, 128)     # 16 heads x 4 columns
    assert not ba.fits(mx.bfloat16, 8, 8, 96, 96) and not ba.fits(mx.bfloat16, 8, 8, 128, 64)
    assert pa.supported(mx.bfloat16, 32, 2, 0, 128, 128)


# (num_heads, num_kv_heads, dim, capacity), dtype, context lengths; capacities up to 4 chunks
# of every warp are one pass, larger ones split (several chunks per warp and partition)
EMU_CASES = {"gqa4-bf16-one": ((8, 2, 128, 200), mx.bfloat16, [1, 199, 64, 65]),
             "gqa4-bf16-split": ((8, 2, 128, 1100), mx.bfloat16, [1100, 700, 0]),
             # few threadgroups wanted: 9 chunks per warp in each of 2 partitions
             "gqa4-f16-split-chunks": ((8, 2, 128, 1100), mx.float16, [1100, 700, 0]),
             "mha-d64-f32": ((4, 4, 64, 70), mx.float32, [70, 5]),
             "g2-d256-f16-split": ((4, 2, 256, 600), mx.float16, [600, 17]),
             "fallback-g16": ((16, 1, 128, 50), mx.float16, [50, 3])}


def test_layouts():
    # one pass while each warp has at most ONE_MAX_CHUNKS chunks; split-K beyond, with enough
    # threadgroups for the GPU and every row covered
    chunk = ba.NW * ba.TPW
    assert ba._layout(1, 8, ba.ONE_MAX_CHUNKS * chunk) == (1, ba.ONE_MAX_CHUNKS, True)
    for B, kvh, cap in ((1, 8, 1280), (1, 8, 32768), (4, 8, 4096), (1, 2, 300000)):
        np_, cpw, one = ba._layout(B, kvh, cap)
        assert not one and np_ * cpw * chunk >= cap > (np_ - 1) * cpw * chunk
        assert B * kvh * np_ >= min(ba.TARGET_TGS, B * kvh * -(-cap // chunk))


@needs_emulator
@pytest.mark.parametrize("case", list(EMU_CASES), ids=list(EMU_CASES))
def test_kernels_on_cpu_emulator(case, tmp_path, monkeypatch):
    """The kernel (one pass, or split with the reduce; the paged kernel with its block size read
    at run time where ours does not fit), as Metal renderings compiled by g++ and run with one
    CPU thread per GPU thread, against float64 attention (zeros for an empty context)."""
    (nh, kvh, d, cap), dtype, lens = EMU_CASES[case]
    assert ba.fits(dtype, nh, kvh, d, d) == (not case.startswith("fallback"))
    rng = np.random.default_rng(list(EMU_CASES).index(case))
    q, kb, vb, cl = _case(rng, nh, kvh, d, cap, lens, dtype)
    B, scale = len(lens), d ** -0.5
    inputs = [q, kb, vb, cl]
    if case.endswith("chunks"):
        monkeypatch.setattr(ba, "TARGET_TGS", 12)
        assert ba._layout(B, kvh, cap) == (2, 9, False)
    if ba.fits(dtype, nh, kvh, d, d):
        t, grid, tg, osh, odt, rt, rgrid, rtg, np_, cpw, one = ba._plan(dtype, B, nh, kvh, d, cap)
        assert one == case.endswith("one") or case.startswith("mha")
        spec, meta = (ba.SPEC_ONE if one else ba.SPEC), pa._meta(cpw, np_, scale, cap)
    else:
        t, grid, tg, osh, odt, rt, rgrid, rtg, np_ = pa._plan(dtype, B, nh, kvh, cap, d, d, 1,
                                                              False, True)
        assert ("BS", 0) in t
        spec, meta, one = pa.SPEC, pa._meta(1, np_, scale, cap), False
        inputs.insert(3, ba._identity_table(B))
    launches = [dict(spec=spec, inputs=inputs + [meta], template=t, grid=grid, threadgroup=tg,
                     output_shapes=osh, output_dtypes=odt)]
    if not one:
        launches.append(dict(spec=pa.REDUCE_SPEC, inputs=[("out", 0, 0), ("out", 0, 1), meta],
                             template=rt, grid=rgrid, threadgroup=rtg,
                             output_shapes=[(B, nh, d)], output_dtypes=[dtype]))
    y = _to64(metal_emulator.emulate(launches, tmp_path)[0])
    assert np.isfinite(y).all(), "unwritten (NaN-filled) outputs"
    nz = [i for i, n in enumerate(lens) if n > 0]
    ref = _attention64(q, kb, vb, cl, scale)
    err = np.linalg.norm(y[nz] - ref[nz]) / np.linalg.norm(ref[nz])
    assert err < TOL[dtype], f"relative error {err:.2e}"
    for i, n in enumerate(lens):
        if n == 0:
            assert np.abs(y[i]).max() == 0.0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32],
                         ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("heads", [(32, 8, 128), (8, 8, 64), (8, 4, 256), (32, 2, 128)],
                         ids=["qwen3-8b", "mha-64", "g2-256", "fallback-g16"])
def test_kernel_matches_float64_gpu(heads, dtype, poison):
    # two capacities with one kernel each; short, partition-edge and long contexts
    nh, kvh, d = heads
    rng = np.random.default_rng(np.random.randint(1 << 30))
    for cap, lens in ((256, [1, 63, 64, 65, 256]), (4352, [4100, 1, 2000]), (33024, [33000])):
        q, kb, vb, cl = _case(rng, nh, kvh, d, cap, lens, dtype)
        y = ba.buffer_attention_kernel(q, kb, vb, cl, d ** -0.5)
        assert np.isfinite(_to64(y)).all(), "unwritten (NaN-poisoned) or non-finite outputs"
        assert _rel(y, _attention64(q, kb, vb, cl, d ** -0.5)) < TOL[dtype], cap


@pytest.mark.gpu
@needs_gpu
def test_selection_checks_and_times_against_sdpa(monkeypatch, tmp_path):
    monkeypatch.setenv("MARLIN_MLX_CACHE_DIR", str(tmp_path))
    from marlin_mlx.kernels import selection
    selection.clear(memory_only=True)
    ba._DECISIONS.clear()
    ba.use_kernel(mx.bfloat16, 32, 8, 128, 128)
    rec = [v for k, v in selection.choices().items() if "buffer_attention" in k]
    assert rec and rec[0]["self_test"] == "pass", rec
