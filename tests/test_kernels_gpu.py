"""Custom kernels against float64 references on a GPU backend (Metal or CUDA).

Run on the lent GPU: `pytest -m gpu tests/test_kernels_gpu.py`. Every launch here has its
output poisoned with NaN first (launch.POISON_OUTPUTS), so an unwritten element fails.
"""

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import formats, launch
from marlin_mlx.kernels.qmv import qmv_kernel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(launch.backend() is None,
                                 reason="needs an MLX GPU backend (Metal or CUDA)")]

# ||y - ref|| / ||ref|| bounds: float32 accumulation everywhere; the output's rounding dominates.
TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison():
    launch.POISON_OUTPUTS = True
    yield
    launch.POISON_OUTPUTS = False


def _to64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _weights(N, K, bits, gs, dtype, seed):
    mx.random.seed(seed)
    w = mx.random.normal((N, K)).astype(dtype)
    q, s, b = mx.quantize(w, group_size=gs, bits=bits)
    return q, s, b


def _ref64(x, q, s, b, bits, gs):
    codes = np.array(formats.unpack(q, "affine", bits), dtype=np.float64)
    N, K = codes.shape
    sc = np.repeat(_to64(s), gs, axis=1)
    bi = np.repeat(_to64(b), gs, axis=1)
    w = codes * sc + bi
    return _to64(x).reshape(-1, K) @ w.T


def _check(y, ref, dtype, shape):
    assert y.shape == shape and y.dtype == dtype
    y64 = _to64(y).reshape(ref.shape)
    assert np.isfinite(y64).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = np.linalg.norm(y64 - ref) / np.linalg.norm(ref)
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_qmv_bits_dtypes(bits, dtype):
    seed = np.random.randint(1 << 30)
    N, K, gs = 300, 1024 + 64, 64
    q, s, b = _weights(N, K, bits, gs, dtype, seed)
    for M in (1, 5):
        x = mx.random.normal((M, K)).astype(dtype)
        y = qmv_kernel(x, q, s, b, gs, bits)
        _check(y, _ref64(x, q, s, b, bits, gs), dtype, (M, N))


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_qmv_group_sizes_odd_shapes(gs, bits):
    # K not a multiple of 512 or of a 32-lane step, N not a multiple of the row tile,
    # M = 3 and M = 17 (grid tiled along M), leading batch dims.
    seed = np.random.randint(1 << 30)
    N, K = 37, gs * {32: 13, 64: 7, 128: 5}[gs]
    q, s, b = _weights(N, K, bits, gs, mx.float16, seed)
    for shape in ((3, K), (17, K), (2, 1, K)):
        x = mx.random.normal(shape).astype(mx.float16)
        y = qmv_kernel(x, q, s, b, gs, bits)
        _check(y, _ref64(x, q, s, b, bits, gs), mx.float16, (*shape[:-1], N))


@pytest.mark.parametrize("R,SK,PF", [(1, 1, 0), (2, 4, 0), (4, 3, 1), (8, 2, 1)])
def test_qmv_tilings(R, SK, PF):
    # Every (rows per simdgroup, split-K, prefetch) choice computes the same function.
    seed = np.random.randint(1 << 30)
    N, K, bits, gs = 131, 4096 + 128, 4, 64
    q, s, b = _weights(N, K, bits, gs, mx.bfloat16, seed)
    x = mx.random.normal((2, K)).astype(mx.bfloat16)
    y = qmv_kernel(x, q, s, b, gs, bits, R=R, SK=SK, PF=PF)
    _check(y, _ref64(x, q, s, b, bits, gs), mx.bfloat16, (2, N))


def test_qmv_scales_dtype_differs_from_x():
    seed = np.random.randint(1 << 30)
    q, s, b = _weights(64, 512, 4, 64, mx.float16, seed)
    x = mx.random.normal((1, 512))  # float32 activations, float16 scales
    y = qmv_kernel(x, q, s, b, 64, 4)
    _check(y, _ref64(x, q, s, b, 4, 64), mx.float32, (1, 64))


@pytest.mark.parametrize("bits,dtype", [(2, mx.float16), (3, mx.bfloat16), (4, mx.float16),
                                        (4, mx.bfloat16), (4, mx.float32), (5, mx.float16),
                                        (6, mx.bfloat16), (8, mx.float16), (8, mx.float32)])
def test_dequantize_kernel(bits, dtype):
    from marlin_mlx.kernels.dequantize import dequantize_kernel
    seed = np.random.randint(1 << 30)
    N, K, gs = 45, 32 * 13, 32
    q, s, b = _weights(N, K, bits, gs, dtype, seed)
    out = dequantize_kernel(q, s, b, gs, bits, dtype)
    codes = np.array(formats.unpack(q, "affine", bits), dtype=np.float64)
    ref = codes * np.repeat(_to64(s), gs, 1) + np.repeat(_to64(b), gs, 1)
    assert out.shape == (N, K) and out.dtype == dtype
    got = _to64(out)
    assert np.isfinite(got).all()
    # one rounding of the float32 result to the output dtype
    rtol = {mx.float32: 1e-6, mx.float16: 1e-3, mx.bfloat16: 8e-3}[dtype]
    assert np.allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def test_quantized_linear_dispatch_and_selection(tmp_path, monkeypatch):
    from marlin_mlx.kernels import QuantizedLinear, doctor_report, selection
    monkeypatch.setenv("MARLIN_MLX_CACHE_DIR", str(tmp_path))
    selection.clear(memory_only=True)
    launch.POISON_OUTPUTS = False
    lin = QuantizedLinear(1024, 512, bias=True, group_size=64, bits=4)
    w = mx.random.normal((512, 1024)).astype(mx.float16)
    lin.weight, lin.scales, lin.biases = mx.quantize(w, group_size=64, bits=4)
    lin.bias = mx.random.normal((512,)).astype(mx.float16)
    for shape in ((1, 1024), (2, 3, 1024), (40, 1024)):
        x = mx.random.normal(shape).astype(mx.float16)
        ref = _ref64(x, lin.weight, lin.scales, lin.biases, 4, 64) + _to64(lin.bias)
        _check(lin(x), ref, mx.float16, (*shape[:-1], 512))
    recs = [v for k, v in selection.choices().items() if "|qmv|" in k]
    assert recs and all(r["self_test"] == "pass" for r in recs), recs
    assert (tmp_path / "selection.json").exists()
    rows = doctor_report(shape=(512, 1024))
    assert all(r["self_test"] in ("pass", "n/a") for r in rows), rows
    for mode in ("custom", "builtin"):
        monkeypatch.setenv(selection.ENV_MODE, mode)
        x = mx.random.normal((1, 1024)).astype(mx.float16)
        ref = _ref64(x, lin.weight, lin.scales, lin.biases, 4, 64) + _to64(lin.bias)
        _check(lin(x), ref, mx.float16, (1, 512))


@pytest.mark.parametrize("bits,dtype,M,PF", [(4, mx.float16, 1, 0), (4, mx.bfloat16, 3, 0),
                                             (8, mx.float16, 8, 0), (3, mx.float32, 2, 0),
                                             (4, mx.bfloat16, 1, 1)])
def test_gated_mlp_kernel(bits, dtype, M, PF):
    from marlin_mlx.kernels.gated_mlp import gated_mlp_kernel
    seed = np.random.randint(1 << 30)
    N, K, gs = 200, 32 * 40, 64
    gate = _weights(N, K, bits, gs, dtype, seed)
    up = _weights(N, K, bits, gs, dtype, seed + 1)
    x = mx.random.normal((M, K)).astype(dtype)
    y = gated_mlp_kernel(x, gate, up, gs, bits, PF=PF)
    g = _ref64(x, *gate, bits, gs)
    u = _ref64(x, *up, bits, gs)
    _check(y, g / (1 + np.exp(-g)) * u, dtype, (M, N))


@pytest.mark.parametrize("bake", [True, False])
def test_swiglu_quantized_layers(bake, monkeypatch):
    # The MLP's gate/up through kernels.swiglu with the fused kernel forced, through both CUDA
    # launch paths (per-template kernel objects, MLX's template path).
    from marlin_mlx.kernels import QuantizedLinear, gated_mlp, qmv, selection, swiglu
    monkeypatch.setenv(selection.ENV_MODE, "custom")
    monkeypatch.setattr(launch, "BAKE", bake)
    monkeypatch.setattr(qmv, "_PLANS", {})
    monkeypatch.setattr(gated_mlp, "_PLANS", {})
    seed = np.random.randint(1 << 30)
    N, K = 96, 640
    layers = []
    for i in range(2):
        lin = QuantizedLinear(K, N, False, 64, 4)
        lin.weight, lin.scales, lin.biases = _weights(N, K, 4, 64, mx.bfloat16, seed + i)
        layers.append(lin)
    for shape in ((1, 1, K), (1, 2, K)):
        x = mx.random.normal(shape).astype(mx.bfloat16)
        y = swiglu(x, *layers)
        g = _ref64(x, layers[0].weight, layers[0].scales, layers[0].biases, 4, 64)
        u = _ref64(x, layers[1].weight, layers[1].scales, layers[1].biases, 4, 64)
        _check(y, g / (1 + np.exp(-g)) * u, mx.bfloat16, (*shape[:-1], N))


@pytest.mark.parametrize("mode,dtype,M", [("mxfp4", mx.bfloat16, 1), ("mxfp4", mx.float16, 5),
                                          ("nvfp4", mx.bfloat16, 1), ("nvfp4", mx.float32, 3),
                                          ("mxfp4", mx.bfloat16, 17)])
def test_fp4_qmv_kernel(mode, dtype, M):
    from marlin_mlx.kernels.fp4_qmv import FORMATS, fp4_qmv_kernel
    seed = np.random.randint(1 << 30)
    mx.random.seed(seed)
    gs = FORMATS[mode][1]
    N, K = 301, 32 * 37
    q, s = mx.quantize(mx.random.normal((N, K)).astype(dtype), group_size=gs, bits=4,
                       mode=mode)[:2]
    x = mx.random.normal((M, K)).astype(dtype)
    y = fp4_qmv_kernel(x, q, s, mode)
    ref = np.array(formats.reference_matmul(x, q, s, None, mode, 4, gs), dtype=np.float64)
    _check(y, ref, dtype, (M, N))


def test_dequantize_kernel_after_input():
    # The variant that waits for the activations computes the same matrix, and the large-M
    # path through it (dequantize + matmul) matches the float64 reference.
    from marlin_mlx.kernels.dequantize import dequantize_kernel
    from marlin_mlx.kernels.quantized_linear import _dq_matmul
    seed = np.random.randint(1 << 30)
    q, s, b = _weights(96, 640, 4, 64, mx.bfloat16, seed)
    x = mx.random.normal((70, 640)).astype(mx.bfloat16)
    a = dequantize_kernel(q, s, b, 64, 4, mx.bfloat16)
    c = dequantize_kernel(q, s, b, 64, 4, mx.bfloat16, after=x)
    assert mx.array_equal(a, c).item()
    _check(_dq_matmul(x, q, s, b, 64, 4), _ref64(x, q, s, b, 4, 64), mx.bfloat16, (70, 96))
