"""CPU-side checks of the kernel ops: dispatch, validation, selection, the reference paths.

The custom kernels themselves run in tests/test_kernels_gpu.py (GPU) and are compiled for
Metal in tests/test_metal_compile.py.
"""

import json

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import QuantizedLinear, doctor_report, launch, quantized_matmul, selection
from marlin_mlx.kernels import qmv as qmv_mod
from marlin_mlx.kernels.qmv import qmv


def _ref64(x, q, s, b, bits, gs):
    from marlin_mlx.kernels import formats
    codes = np.array(formats.unpack(q, "affine", bits), dtype=np.float64)
    w = codes * np.repeat(np.array(s, np.float64), gs, 1) + np.repeat(np.array(b, np.float64), gs, 1)
    return np.array(x, np.float64).reshape(-1, w.shape[1]) @ w.T


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("M", [1, 3, 17])
def test_qmv_cpu_path_matches_float64(bits, M):
    gs = 32
    K, N = 32 * 11, 29  # K not a multiple of 512, N odd
    q, s, b = mx.quantize(mx.random.normal((N, K)), group_size=gs, bits=bits)
    x = mx.random.normal((M, K))
    y = qmv(x, q, s, b, gs, bits)
    ref = _ref64(x, q, s, b, bits, gs)
    err = np.linalg.norm(np.array(y, np.float64) - ref) / np.linalg.norm(ref)
    assert y.shape == (M, N) and err < 1e-5


def test_qmv_validation_errors():
    q, s, b = mx.quantize(mx.random.normal((64, 256)), group_size=64, bits=4)
    x = mx.random.normal((1, 256))
    with pytest.raises(ValueError, match="does not match"):
        qmv(mx.random.normal((1, 128)), q, s, b, 64, 4)
    with pytest.raises(ValueError, match="bits"):
        qmv(x, q, s, b, 64, 7)
    with pytest.raises(ValueError, match="group"):
        qmv(x, q, s, b, 48, 4)
    with pytest.raises(ValueError, match="floating"):
        qmv(x.astype(mx.int32), q, s, b, 64, 4)
    with pytest.raises(ValueError, match="biases"):
        qmv(x, q, s, None, 64, 4)
    with pytest.raises(ValueError, match="uint32"):
        qmv(x, q.astype(mx.int32), s, b, 64, 4)


def test_config_covers_short_and_tall_outputs():
    # split-K for short outputs, none where rows alone fill the GPU; never more SK than steps
    assert qmv_mod.config(1, 4096, 12288, 4)[1] > 1
    assert qmv_mod.config(1, 151936, 4096, 4)[1] == 1
    R, SK = qmv_mod.config(1, 64, 512, 4)
    assert SK == 1 and R >= 1


def test_quantized_linear_cpu_uses_reference_and_matches():
    mx.random.seed(3)
    lin = QuantizedLinear(256, 96, bias=True, group_size=64, bits=4)
    w = mx.random.normal((96, 256))
    lin.weight, lin.scales, lin.biases = mx.quantize(w, group_size=64, bits=4)
    lin.bias = mx.random.normal((96,))
    x = mx.random.normal((2, 3, 256))
    y = lin(x)
    ref = _ref64(x, lin.weight, lin.scales, lin.biases, 4, 64) + np.array(lin.bias, np.float64)
    assert y.shape == (2, 3, 96)
    assert np.allclose(np.array(y).reshape(-1, 96), ref, rtol=1e-4, atol=1e-4)
    # a batched decode step's (B, 1, K) input: leading dimensions fold into M
    x = mx.random.normal((5, 1, 256))
    ref = _ref64(x, lin.weight, lin.scales, lin.biases, 4, 64) + np.array(lin.bias, np.float64)
    y = lin(x)
    assert y.shape == (5, 1, 96)
    assert np.allclose(np.array(y).reshape(-1, 96), ref, rtol=1e-4, atol=1e-4)


def test_quantized_matmul_other_modes_go_builtin():
    w = mx.random.normal((64, 128))
    q, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
    x = mx.random.normal((1, 128))
    y = quantized_matmul(x, q, s, None, 32, 4, "mxfp4")
    ref = mx.quantized_matmul(x, q, s, None, transpose=True, group_size=32, bits=4, mode="mxfp4")
    assert mx.array_equal(y, ref)


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
def test_fp4_large_m_dequantize_then_matmul_matches_builtin(mode):
    # the large-M path for fp4 formats on a GPU (selected there by measurement)
    from marlin_mlx.kernels.quantized_linear import _dq_matmul_fp4

    mx.random.seed(4)
    gs = 32 if mode == "mxfp4" else 16
    q, s = mx.quantize(mx.random.normal((48, 128)), group_size=gs, bits=4, mode=mode)[:2]
    x = mx.random.normal((70, 128))
    ref = mx.quantized_matmul(x, q, s, None, transpose=True, group_size=gs, bits=4, mode=mode)
    assert mx.allclose(_dq_matmul_fp4(x, q, s, mode), ref, rtol=1e-4, atol=1e-4).item()


def test_selection_env_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MARLIN_MLX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(selection.ENV_MODE, "bogus")
    with pytest.raises(ValueError, match="MARLIN_MLX_KERNELS"):
        selection.mode()
    monkeypatch.setenv(selection.ENV_MODE, "auto")
    assert selection.cache_dir() == tmp_path
    # a disagreeing "kernel" is rejected with a warning, a correct faster one is kept
    inputs = lambda: (mx.random.normal((64, 64)),)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="disagrees"):
        rec = selection.measure("t", "f", inputs, lambda a: a + 1, lambda a: a, lambda a: a, 1e-3)
    assert rec["self_test"] == "fail" and rec["chosen_path"] == "builtin"
    rec = selection.measure("t", "f", inputs, lambda a: a, lambda a: (a @ a) * 0 + a,
                            lambda a: a, 1e-3)
    assert rec["self_test"] == "pass" and rec["chosen_path"] in ("custom", "builtin")
    # a margin keeps a slower "fusion" (here ~10x slower) only when the margin covers it
    slow = lambda a: (a @ a @ a @ a) * 0 + a  # noqa: E731
    for margin, chosen in ((1.0, "builtin"), (1e6, "custom")):
        r = selection.measure("t", "f", inputs, slow, lambda a: a, lambda a: a, 1e-3, margin)
        assert r["chosen_path"] == chosen, r
    selection.clear(memory_only=True)
    selection._CHOICES["k"] = rec
    selection._save()
    assert json.loads((tmp_path / "selection.json").read_text())["k"]["self_test"] == "pass"
    selection.clear()
    assert not (tmp_path / "selection.json").exists()


def test_doctor_report_on_cpu():
    rows = doctor_report()
    assert rows and {"op", "format", "self_test", "chosen_path", "detail"} <= set(rows[0])
    if launch.backend() is None:
        assert all(r["chosen_path"] in ("reference", "builtin") for r in rows)


def test_launch_sources_split_into_header_and_body():
    for be in ("metal", "cuda"):
        header, body = launch.parts(qmv_mod.SPEC, be)
        assert "k_simd_sum" in header and "lane" in body and "//// BODY" not in body
    cuda = launch.render_cuda(qmv_mod.SPEC, [mx.float16, mx.uint32, mx.float16, mx.float16],
                              [mx.float16], qmv_mod.template_for(mx.float16, mx.float16, 4, 64,
                                                                 1, 1, 512, 64))
    assert "__global__ void custom_kernel_marlin_qmv" in cuda and "constexpr int BITS = 4;" in cuda


def test_baked_cuda_source_is_mlx_template_rendering():
    # The CUDA fast path writes the template constants into the source itself; the body must be
    # exactly what MLX generates for the templated launch (render_cuda), so it compiles the same.
    t = qmv_mod.template_for(mx.bfloat16, mx.bfloat16, 4, 64, 1, 1, 4096, 12288)
    name, header, source = launch.baked_cuda_source(qmv_mod.SPEC, t)
    full = launch.render_cuda(qmv_mod.SPEC, [mx.bfloat16, mx.uint32, mx.bfloat16, mx.bfloat16],
                              [mx.bfloat16], t)
    sig = "custom_kernel_" + name + "("
    assert sig in full
    assert full.split(sig, 1)[1].split(") {\n", 1)[1].startswith(source)
    assert header in full


@pytest.mark.parametrize("mode,dtype,MT", [("mxfp4", mx.bfloat16, 1), ("nvfp4", mx.float16, 3)])
def test_fp4_qmv_body_on_cpu_emulator(mode, dtype, MT, tmp_path):
    # The FP4 kernel's Metal rendering run by g++ with a CPU thread per GPU thread
    # (tests/metal_emulator.py): decoding, split-K and the row/M tails against the float32 oracle.
    import metal_emulator
    from marlin_mlx.kernels import fp4_qmv, formats
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    N, K = 9, 32 * 5
    gs = fp4_qmv.FORMATS[mode][1]
    q, s = mx.quantize(mx.random.normal((N, K)), group_size=gs, bits=4, mode=mode)[:2]
    x = mx.random.normal((MT, K)).astype(dtype)
    t, grid, tg, osh, odt, _, _ = fp4_qmv._plan(dtype, mode, (MT, K), N, R=2, SK=2)
    y = metal_emulator.emulate([dict(spec=fp4_qmv.SPEC, inputs=[x, q, s], template=t, grid=grid,
                                 threadgroup=tg, output_shapes=osh, output_dtypes=odt)], tmp_path)[0]
    ref = np.array(formats.reference_matmul(x, q, s, None, mode, 4, gs), np.float64)
    y = np.array(y.astype(mx.float32), np.float64)
    assert np.isfinite(y).all()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < {mx.bfloat16: 1e-2, mx.float16: 2e-3}[dtype]


@pytest.mark.parametrize("bits,dtype", [(4, mx.bfloat16), (8, mx.float16), (2, mx.float16),
                                        (3, mx.bfloat16), (4, mx.float32)])
def test_dequantize_body_on_cpu_emulator(bits, dtype, monkeypatch):
    # Both thread mappings of src/dequantize.h (8 codes a thread for 2/4/8 bits into 16-bit
    # types, 32 otherwise), rendered for Metal and run by g++, against float64 rounded to dtype.
    import metal_emulator
    from marlin_mlx.kernels import dequantize, formats
    if not metal_emulator.available():
        pytest.skip("no C++20 g++")
    monkeypatch.setattr(dequantize, "launch", metal_emulator.run)
    N, K, gs = 5, 64 * 3, 64
    q, s, b = mx.quantize(mx.random.normal((N, K)), group_size=gs, bits=bits)
    s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    out = dequantize.dequantize_kernel(q, s, b, gs, bits, dtype)
    codes = np.array(formats.unpack(q, "affine", bits), dtype=np.float64)
    ref = (codes * np.repeat(np.array(s.astype(mx.float32), np.float64), gs, 1)
           + np.repeat(np.array(b.astype(mx.float32), np.float64), gs, 1))
    ref = np.array(mx.array(ref.astype(np.float32)).astype(dtype).astype(mx.float32))
    got = np.array(out.astype(mx.float32))
    assert out.shape == (N, K) and out.dtype == dtype
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
    assert (got == ref).mean() > 0.99  # one rounding of s * q + b, as the reference


@pytest.mark.parametrize("MT", [1, 3, 20])
def test_affine_qmv_body_on_cpu_emulator(MT, tmp_path):
    # The affine GEMV's Metal rendering run by g++ (tests/metal_emulator.py), including M above
    # one 8-row tile (the grid's y axis tiles M; `qmv` takes any M), against the float32 oracle.
    import metal_emulator
    from marlin_mlx.kernels import formats, qmv
    if not metal_emulator.available():
        pytest.skip("no C++20 g++")
    N, K, gs = 10, 64 * 3, 64
    q, s, b = mx.quantize(mx.random.normal((N, K)), group_size=gs, bits=4)
    x = mx.random.normal((MT, K)).astype(mx.float16)
    s, b = s.astype(mx.float16), b.astype(mx.float16)
    t, grid, tg, osh, odt, _, _ = qmv._plan(mx.float16, mx.float16, 4, gs, (MT, K), N, 2, 2)
    y = metal_emulator.emulate([dict(spec=qmv.SPEC, inputs=[x, q, s, b], template=t, grid=grid,
                                     threadgroup=tg, output_shapes=osh, output_dtypes=odt)],
                               tmp_path)[0]
    ref = np.array(formats.reference_matmul(x, q, s, b, "affine", 4, gs), np.float64)
    y = np.array(y.astype(mx.float32), np.float64)
    assert np.isfinite(y).all()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-3
