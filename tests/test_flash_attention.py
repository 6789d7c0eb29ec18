"""flash_prefill (kernels/flash_attention.py): causal attention with large heads on tensor cores,
against a float64 NumPy reference; the Metal rendering on the CPU emulator (CI), the CUDA build
on a GPU (`-m gpu`)."""

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import flash_attention as fa
from marlin_mlx.kernels import launch

TOL = {mx.float16: 4e-3, mx.bfloat16: 2e-2}


def _inputs(B, H, HK, L, S, D, DV, dtype, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((B, H, L, D)).astype(dtype)
    k = mx.random.normal((B, HK, S, D)).astype(dtype)
    v = mx.random.normal((B, HK, S, DV)).astype(dtype)
    return q, k, v


def _reference64(q, k, v, scale):
    q, k, v = (np.array(a.astype(mx.float32)).astype(np.float64) for a in (q, k, v))
    B, H, L, _ = q.shape
    HK, S = k.shape[1], k.shape[2]
    k = np.repeat(k, H // HK, axis=1)
    v = np.repeat(v, H // HK, axis=1)
    s = np.einsum("bhld,bhsd->bhls", q, k) * scale
    allowed = np.arange(S)[None, :] <= np.arange(L)[:, None] + (S - L)
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhls,bhsd->bhld", p, v)


def _rel_err(o, ref):
    o = np.array(o.astype(mx.float32)).astype(np.float64)
    assert np.isfinite(o).all()
    return np.linalg.norm(o - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("dtype,B,H,HK,L,S,D,DV,DVB", [
    (mx.bfloat16, 1, 2, 1, 70, 100, 48, 40, None),   # grouped heads, cache in front, tails
    (mx.float16, 2, 1, 1, 33, 33, 32, 32, 16),       # two batches, two column blocks
])
def test_flash_prefill_on_cpu_emulator(dtype, B, H, HK, L, S, D, DV, DVB, tmp_path):
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    q, k, v = _inputs(B, H, HK, L, S, D, DV, dtype)
    scale = D ** -0.5
    template, grid, tg, oshape = fa.plan(q, k, v, DVB)
    meta = mx.array([L, S], dtype=mx.int32)
    sl2 = mx.array([scale * np.log2(np.e)], dtype=mx.float32)
    o = metal_emulator.emulate([dict(spec=fa.SPEC, inputs=[q, k, v, meta, sl2], template=template,
                                     grid=grid, threadgroup=tg, output_shapes=[oshape],
                                     output_dtypes=[dtype])], tmp_path)[0]
    assert o.shape == (B, H, L, DV)
    assert _rel_err(o, _reference64(q, k, v, scale)) < TOL[dtype]


def test_flash_supported_shapes():
    q, k, v = _inputs(1, 4, 2, 8, 12, 256, 256, mx.bfloat16)
    assert fa.supported(q, k, v)
    assert fa.dv_block(256) == 256 and fa.dv_block(512) == 256 and fa.dv_block(40) == 40
    assert not fa.supported(q.astype(mx.float32), k, v)          # 16-bit only
    assert not fa.supported(q[:, :, :, :200], k[..., :200], v)   # D not a multiple of 16
    assert not fa.supported(q, k[:, :, :6], v[:, :, :6])          # more queries than keys
    assert not fa.supported(q[:, :3], k, v)                       # heads not a multiple of HK
    with pytest.raises(ValueError):
        fa.dv_block(256, 96)


def test_flash_cpu_falls_back_to_mlx():
    q, k, v = _inputs(1, 2, 2, 5, 9, 32, 32, mx.float16)
    with mx.stream(mx.cpu):
        o = fa.flash_attention(q, k, v, 0.2)
        ref = fa.reference(q, k, v, 0.2)
    assert mx.array_equal(o, ref)


def _gpu():
    if launch.backend() is None:
        pytest.skip("needs a GPU backend (Metal or CUDA)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("L,S,DVB", [(300, 300, None), (200, 333, None), (130, 130, 256),
                                     (2, 64, None)])
def test_flash_prefill_gpu_matches_float64(dtype, L, S, DVB, monkeypatch):
    _gpu()
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    q, k, v = _inputs(1, 20, 20, L, S, 256, 256, dtype, seed=L)
    scale = 0.0625
    o = fa.flash_prefill_kernel(q, k, v, scale, DVB)
    assert _rel_err(o, _reference64(q, k, v, scale)) < TOL[dtype]


@pytest.mark.gpu
def test_flash_prefill_gpu_grouped_heads(monkeypatch):
    _gpu()
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    q, k, v = _inputs(2, 8, 2, 77, 140, 192, 128, mx.bfloat16, seed=3)
    o = fa.flash_prefill_kernel(q, k, v, 0.07)
    assert _rel_err(o, _reference64(q, k, v, 0.07)) < TOL[mx.bfloat16]
