"""qmm (tensor-core small-M product over MLX's affine layout): its Metal rendering run on the CPU
emulator (the fragment layout, the k permutation, the decode paths, split-K and every tail),
and on the GPU against the float64 oracle with poisoned outputs."""

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import formats, launch, qmm

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _case(MT, N, K, bits, gs, dtype, sdt=None, seed=0):
    mx.random.seed(seed)
    q, s, b = mx.quantize(mx.random.normal((N, K)), group_size=gs, bits=bits)
    sdt = sdt or dtype
    return mx.random.normal((MT, K)).astype(dtype), q, s.astype(sdt), b.astype(sdt)


def _rel_err(y, x, q, s, b, bits, gs):
    ref = np.array(formats.reference_matmul(x, q, s, b, "affine", bits, gs), np.float64)
    y = np.array(y.astype(mx.float32), np.float64)
    assert y.shape == ref.shape and np.isfinite(y).all()
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


TOL = {mx.float16: 3e-3, mx.bfloat16: 1.5e-2}


@pytest.mark.parametrize("bits,dtype,MT,gs", [
    (4, mx.float16, 5, 64),     # the 16-bit pair decode (float16 magic), one partial M tile
    (4, mx.bfloat16, 20, 32),   # bfloat16 magic, two M tiles
    (8, mx.float16, 3, 64),     # 8-bit pairs in float16
    (8, mx.bfloat16, 17, 64),   # 8-bit in bfloat16: the float decode
    (3, mx.float16, 2, 64),     # codes straddling words
    (2, mx.bfloat16, 33, 32),   # three M tiles (NT = 2)
])
def test_qmm_body_on_cpu_emulator(bits, dtype, MT, gs, tmp_path):
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    # K = 320: 10 chunks of 32, so the last 128-wide step has two idle lanes per row; N = 20 is
    # not a multiple of the 8 * NT columns of a threadgroup; SK = 2 splits the three steps.
    N, K = 20, 320
    x, q, s, b = _case(MT, N, K, bits, gs, dtype, sdt=mx.float32 if bits == 3 else None)
    t, grid, tg, osh, odt, _, _, rows = qmm.plan(dtype, s.dtype, bits, gs, (MT, K), N, SK=2)
    y = metal_emulator.emulate([dict(spec=qmm.SPEC, inputs=[x, q, s, b, rows], template=t,
                                     grid=grid, threadgroup=tg, output_shapes=osh,
                                     output_dtypes=odt)], tmp_path)[0]
    assert _rel_err(y, x, q, s, b, bits, gs) < TOL[dtype]


def test_qmm_config_and_support():
    x = mx.zeros((8, 4096), mx.float16)
    q, s, b = mx.quantize(mx.zeros((256, 4096)), bits=4, group_size=64)
    assert qmm.supported(x, q, s, b, 64, 4)
    assert not qmm.supported(x.astype(mx.float32), q, s, b, 64, 4)  # tensor cores take 16-bit x
    assert not qmm.supported(mx.zeros((65, 4096), mx.float16), q, s, b, 64, 4)
    assert not qmm.supported(x, q, s, None, 64, 4)
    for MT in (1, 16, 33, 64):
        for N, K in ((4096, 4096), (12288, 4096), (4096, 12288), (64, 256)):
            NT, SK = qmm.config(MT, N, K)
            mtiles = -(-MT // 16)
            assert SK * mtiles * 16 * 8 * NT * 4 <= qmm.SHARED_BYTES  # split-K buffer fits
            assert 1 <= SK <= min(qmm.MAX_SK, -(-K // 128))


def test_qmm_cpu_falls_back_to_reference():
    x, q, s, b = _case(6, 24, 256, 4, 64, mx.float16)
    y = qmm.qmm(x, q, s, b, 64, 4)
    assert mx.array_equal(y, qmm.reference(x, q, s, b, 64, 4))
    with pytest.raises(ValueError):
        qmm.qmm(x[:, :100], q, s, b, 64, 4)


def _gpu():
    return launch.backend() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("bits", qmm.BITS)
@pytest.mark.parametrize("dtype", qmm.X_DTYPES)
@pytest.mark.parametrize("MT", [2, 17, 64])
def test_qmm_gpu_matches_float64(bits, dtype, MT, monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    gs = 32 if bits in (3, 5) else 64
    N, K = 1000, 4096 + 320  # odd N tail, a partial last K step
    x, q, s, b = _case(MT, N, K, bits, gs, dtype, seed=MT + bits)
    y = qmm.qmm_kernel(x, q, s, b, gs, bits)
    assert _rel_err(y, x, q, s, b, bits, gs) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("NT,SK", [(1, 1), (2, 3), (4, 8)])
def test_qmm_gpu_tilings(NT, SK, monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    x, q, s, b = _case(24, 4096, 2048, 4, 64, mx.bfloat16, sdt=mx.float32)
    y = qmm.qmm_kernel(x, q, s, b, 64, 4, NT=NT, SK=SK)
    assert _rel_err(y, x, q, s, b, 4, 64) < TOL[mx.bfloat16]
