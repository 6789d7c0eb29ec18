"""qmv's tensor-core body (src/qmv_tc.h: weights as the A operand, rows of x as the columns):
its Metal rendering on the CPU emulator (fragment layout, k permutation, every decode kind,
split-K and the tails), the dispatch between the two bodies, and on the GPU against the float64
oracle with poisoned outputs."""

import pytest

import mlx.core as mx

from marlin_mlx.kernels import launch, qmv
from test_qmm import TOL, _case, _rel_err  # qmm's case builder and float64 error: same layout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("bits,dtype,MT,gs,RT,SK,U,PIPE,K", [
    (4, mx.float16, 1, 64, 1, 2, 1, 0, 320),    # float16 magic, one row of x, split-K
    (4, mx.bfloat16, 3, 32, 2, 2, 2, 0, 320),   # bfloat16 magic, two row tiles, 32-wide groups
    (2, mx.bfloat16, 8, 64, 1, 1, 4, 0, 320),   # 2-bit pairs, every column, a ragged last step
    (8, mx.float16, 5, 64, 2, 3, 1, 0, 384),    # 8-bit pairs (float16 only), uneven split-K
    # asynchronous-copy stages: zero-filled tails, the stage ring wrapping, every decode kind
    (4, mx.float16, 1, 32, 1, 2, 2, 3, 320),
    (4, mx.bfloat16, 8, 64, 1, 1, 1, 2, 384),
    (2, mx.bfloat16, 3, 64, 2, 1, 2, 4, 384),
    (8, mx.float16, 5, 64, 1, 2, 1, 3, 384),
])
def test_qmv_tc_body_on_cpu_emulator(bits, dtype, MT, gs, RT, SK, U, PIPE, K, tmp_path):
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    # K = 320 / 384: a last step with idle lanes; N = 40 is not a multiple of 16 * RT rows
    N = 40
    x, q, s, b = _case(MT, N, K, bits, gs, dtype, seed=bits + MT)
    t, grid, tg, osh, odt, _, _ = qmv.tc_plan(dtype, s.dtype, bits, gs, (MT, K), N, RT=RT, SK=SK,
                                               U=U, PIPE=PIPE)
    assert dict(t)["PIPE"] == PIPE and dict(t)["SK"] == SK
    y = metal_emulator.emulate([dict(spec=qmv.TC_SPEC, inputs=[x, q, s, b], template=t,
                                     grid=grid, threadgroup=tg, output_shapes=osh,
                                     output_dtypes=odt)], tmp_path)[0]
    assert _rel_err(y, x, q, s, b, bits, gs) < TOL[dtype]


def test_qmv_tc_support_and_config():
    assert qmv.tc_supported(mx.bfloat16, 4, 1) and qmv.tc_supported(mx.float16, 8, 8)
    assert not qmv.tc_supported(mx.float32, 4, 1)      # the products take 16-bit x
    assert not qmv.tc_supported(mx.bfloat16, 8, 1)     # 8-bit codes overflow bfloat16's 128
    assert not qmv.tc_supported(mx.float16, 3, 1)      # codes straddle the 16-bit halves
    assert not qmv.tc_supported(mx.float16, 4, 9)      # more rows than the product's columns
    for N, K in ((4096, 4096), (12288, 4096), (4096, 12288), (64, 256), (8192, 28672)):
        RT, SK, U, PIPE = qmv.tc_config(N, K, PIPE=4)
        assert RT in (1, 2) and 1 <= SK <= min(8, -(-K // (128 * U)))
        assert qmv.tc_shared_bytes(RT, SK, U, PIPE, 4, 64, 2, 1) <= 48 * 1024
    assert qmv.tc_config(40, 320, PIPE=3)[3] == 0            # 5 groups a row: not whole words
    assert qmv.tc_config(40, 320, PIPE=3, gs=32)[3] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not launch.backend(), reason="needs an MLX GPU backend")
def test_qmv_dispatch_picks_the_body(monkeypatch):
    """With the tensor-core body switched on, float32 x, 3 bits or a float-body shape (R) still
    take the float body; 16-bit x the tensor cores (each checked against the oracle, so a wrong
    dispatch to a wrong kernel fails)."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    monkeypatch.setattr(qmv, "USE_TC", True)
    for dtype, bits, kw in ((mx.float32, 4, {}), (mx.float16, 3, {}), (mx.bfloat16, 4, {}),
                            (mx.bfloat16, 4, {"R": 2}), (mx.bfloat16, 4, {"tc": False})):
        x, q, s, b = _case(2, 300, 1024, bits, 64, dtype)
        y = qmv.qmv_kernel(x, q, s, b, 64, bits, **kw)
        assert _rel_err(y, x, q, s, b, bits, 64) < TOL.get(dtype, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not launch.backend(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("bits,dtype", [(4, mx.bfloat16), (4, mx.float16), (2, mx.bfloat16),
                                        (8, mx.float16)])
@pytest.mark.parametrize("MT", [1, 3, 8])
def test_qmv_tc_gpu_matches_float64(bits, dtype, MT, monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    N, K = 1000, 4096 + 320  # an N tail, a partial last K step
    x, q, s, b = _case(MT, N, K, bits, 64, dtype, seed=MT + bits)
    y = qmv.qmv_kernel(x, q, s, b, 64, bits, tc=True)
    assert _rel_err(y, x, q, s, b, bits, 64) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not launch.backend(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("RT,SK,U,PIPE", [(1, 1, 1, 0), (2, 3, 2, 0), (2, 8, 1, 0), (1, 8, 4, 0),
                                          (1, 4, 3, 0), (1, 4, 2, 4), (2, 2, 1, 3), (1, 1, 2, 2)])
def test_qmv_tc_gpu_tilings(RT, SK, U, PIPE, monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    x, q, s, b = _case(1, 12288, 4096 + 128, 4, 64, mx.bfloat16, sdt=mx.float32)
    y = qmv.qmv_kernel(x, q, s, b, 64, 4, tc=True, RT=RT, SK=SK, U=U, PIPE=PIPE)
    assert _rel_err(y, x, q, s, b, 4, 64) < TOL[mx.bfloat16]
