"""large_qmm (4-bit product for many rows of x on warpgroup tensor cores): the k permutation of
x, the body's per-warp form run on the CPU emulator (fragments, swizzle, stages, tails), and the
wgmma form on the GPU against the float64 oracle with poisoned outputs."""

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import formats, large_qmm, launch, quantized_linear, selection

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOL = {mx.float16: 3e-3, mx.bfloat16: 1.5e-2}


def _case(M, N, K, gs, dtype, sdt=None, seed=0):
    mx.random.seed(seed)
    q, s, b = mx.quantize(mx.random.normal((N, K)), group_size=gs, bits=4)
    sdt = sdt or dtype
    return mx.random.normal((M, K)).astype(dtype), q, s.astype(sdt), b.astype(sdt)


def _rel_err(y, x, q, s, b, gs):
    ref = np.array(formats.reference_matmul(x, q, s, b, "affine", 4, gs), np.float64)
    y = np.array(y.astype(mx.float32), np.float64)
    assert y.shape == ref.shape and np.isfinite(y).all()
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def test_permute_x_matches_the_decode_order():
    # slot 16 P + s of a block holds the value the A fragment's slot s of product P decodes:
    # lane c's pair p = 2 kk + (s >= 8) of half h (P = 4 h + kk), low (e = 0) or high value
    K = 256
    x = mx.arange(K, dtype=mx.float32).reshape(1, K)
    got = np.array(large_qmm.permute_x(x))[0]
    for blk in range(K // 128):
        for P in range(8):
            h, kk = divmod(P, 4)
            for s in range(16):
                c, e, p = (s % 8) // 2, s % 2, 2 * kk + s // 8
                k = 128 * blk + 32 * c + 16 * h + 8 * (p // 4) + p % 4 + 4 * e
                assert got[128 * blk + 16 * P + s] == k


def test_permute_kernel_on_cpu_emulator(tmp_path):
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    M, K = 3, 384
    x = (mx.arange(M * K) % 2039).astype(mx.float16).reshape(M, K)  # every value exact
    sp = large_qmm.SPEC_PERMUTE
    y = metal_emulator.emulate([dict(spec=sp, inputs=[x, launch.rows_input(M)],
                                     template=[("T", mx.float16), ("K", K)], grid=(160, 1, 1),
                                     threadgroup=(32, 1, 1), output_shapes=[(M, K)],
                                     output_dtypes=[mx.float16])], tmp_path)[0]
    assert mx.array_equal(y, large_qmm.permute_x(x))


@pytest.mark.parametrize("dtype,gs,sdt,M,tiling", [
    (mx.bfloat16, 64, None, 70, {}),                        # Metal tiling, a partial x tile
    (mx.float16, 32, mx.float32, 5, {}),                    # few rows, float32 scales, g32
    (mx.bfloat16, 128, None, 130, dict(MW=2, NX=128, ST=4)),  # the CUDA tiling, 2 stages ahead
    (mx.float16, 64, None, 64, dict(MW=1, NX=64, WG=1, ST=3)),  # one warpgroup, 1 stage ahead
])
def test_large_qmm_body_on_cpu_emulator(dtype, gs, sdt, M, tiling, tmp_path):
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    # N = 200: not a multiple of the threadgroup's weight rows; K = 640: five stages
    N, K = 200, 640
    x, q, s, b = _case(M, N, K, gs, dtype, sdt)
    sp, t, grid, tg = large_qmm.plan(dtype, s.dtype, gs, M, K, N, be="metal", **tiling) \
        if not tiling else large_qmm.plan(dtype, s.dtype, gs, M, K, N, be="cuda", **tiling)
    y = metal_emulator.emulate([dict(spec=sp, inputs=[large_qmm.permute_x(x), q, s, b,
                                                      launch.rows_input(M)],
                                     template=t, grid=grid, threadgroup=tg,
                                     output_shapes=[(M, N)], output_dtypes=[dtype])], tmp_path)[0]
    assert _rel_err(y, x, q, s, b, gs) < TOL[dtype]


def test_large_qmm_support_and_fallback():
    x, q, s, b = _case(6, 24, 256, 64, mx.float16)
    assert large_qmm.supported(x, q, s, b, 64, 4)
    assert not large_qmm.supported(x.astype(mx.float32), q, s, b, 64, 4)
    assert not large_qmm.supported(x, q, s, None, 64, 4)
    assert not large_qmm.supported(x[:, :192], q[:, :24], s[:, :3], b[:, :3], 64, 4)  # K % 128
    y = large_qmm.large_qmm(x, q, s, b, 64, 4)  # the CPU: the reference
    assert mx.array_equal(y, large_qmm.reference(x, q, s, b, 64, 4))
    with pytest.raises(ValueError):
        large_qmm.plan(mx.float16, mx.float16, 64, 512, 4096, 4096, NX=128, ST=2, be="metal")


def _gpu():
    return launch.backend() is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("dtype", large_qmm.X_DTYPES)
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("M", [65, 200, 512])
def test_large_qmm_gpu_matches_float64(dtype, gs, M, monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    N, K = 1000, 4096 + 128  # N not a multiple of 256, K of 512
    x, q, s, b = _case(M, N, K, gs, dtype, seed=M + gs)
    y = large_qmm.large_qmm_kernel(x, q, s, b, gs)
    assert _rel_err(y, x, q, s, b, gs) < TOL[dtype]
    assert mx.array_equal(large_qmm.permute_kernel(x), large_qmm.permute_x(x))


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("tiling", [dict(MW=1, NX=128, ST=3), dict(MW=2, NX=64, ST=4),
                                    dict(MW=2, NX=128, ST=2), dict(MW=1, NX=64, WG=1, ST=5),
                                    dict(MW=2, NX=128, ST=6)])
def test_large_qmm_gpu_tilings(tiling, monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    x, q, s, b = _case(300, 2048, 2048, 64, mx.bfloat16, sdt=mx.float32)
    y = large_qmm.large_qmm_kernel(x, q, s, b, 64, **tiling)
    assert _rel_err(y, x, q, s, b, 64) < TOL[mx.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu(), reason="needs an MLX GPU backend")
def test_quantized_matmul_routes_many_rows_to_large_qmm(monkeypatch, tmp_path):
    monkeypatch.setenv("MARLIN_MLX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(selection.ENV_MODE, "custom")  # the selection would time it first
    monkeypatch.setattr(quantized_linear, "LARGE_QMM", True)  # opt-in (MARLIN_MLX_LARGE_QMM=1)
    selection.clear(memory_only=True)
    quantized_linear._PATHS.clear()
    x, q, s, b = _case(300, 1024, 2048, 64, mx.bfloat16, seed=3)
    x = x.reshape(1, 300, 2048)  # a prefill's (batch, tokens, K)
    y = quantized_linear.quantized_matmul(x, q, s, b, 64, 4)
    assert list(quantized_linear._PATHS.values()) == [quantized_linear._LQMM]
    assert y.shape == (1, 300, 1024)
    assert _rel_err(y[0], x[0], q, s, b, 64) < TOL[mx.bfloat16]
    quantized_linear._PATHS.clear()
