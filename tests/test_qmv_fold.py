"""qmv's folded tensor-core body (src/qmv_fold.h: codes as magic-number values in the products,
the affine step once per group in float): its Metal rendering on the CPU emulator (fragment
order, the float16 16 q / x / 16 pairing, the sums product, split-K, row tails, 2-8 rows of x,
the one-row 16-byte pieces), what it covers, and on the GPU against the float64 oracle with
poisoned outputs."""

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import launch, qmv
from test_qmm import TOL, _case, _rel_err  # qmm's case builder and float64 error: same layout

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("dtype,gs,RT,SK,PF,K", [
    (mx.float16, 64, 1, 2, 1, 1280),  # float16: odd codes at 16 q met by x / 16; 3 and 2 steps
    (mx.bfloat16, 32, 2, 3, 0, 768),  # bfloat16 shifts, two row tiles, 8 groups a step
    (mx.float16, 128, 1, 3, 1, 768),  # 2 groups a step, 16-byte code loads, one step each
    (mx.bfloat16, 64, 2, 1, 1, 1024), # one simdgroup: both register sets in turn, twice
    (mx.float16, 64, 1, 1, 2, 1792),  # three register sets: 7 steps wrap the ring twice
    (mx.bfloat16, 32, 1, 2, 2, 1280), # three sets over two simdgroups (3 and 2 steps)
])
def test_qmv_fold_body_on_cpu_emulator(dtype, gs, RT, SK, PF, K, tmp_path):
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    N = 40  # not a multiple of 16 * RT rows: the last tile reads clamped rows, writes none
    x, q, s, b = _case(1, N, K, 4, gs, dtype, seed=gs + RT)
    t, grid, tg, osh, odt, _, _, rows = qmv.fold_plan(dtype, s.dtype, gs, (1, K), N, RT=RT,
                                                       SK=SK, PF=PF)
    assert dict(t)["SK"] == SK and dict(t)["RT"] == RT and dict(t)["PF"] == PF
    y = metal_emulator.emulate([dict(spec=qmv.FOLD_SPEC, inputs=[x, q, s, b, rows], template=t,
                                     grid=grid, threadgroup=tg, output_shapes=osh,
                                     output_dtypes=odt)], tmp_path)[0]
    assert _rel_err(y, x, q, s, b, 4, gs) < TOL[dtype]


def _row_errors(y, x, q, s, b, gs):
    """Each row's relative error against the float64 oracle (a row given another row's x, or
    left unwritten, fails on its own)."""
    from marlin_mlx.kernels import formats
    ref = np.array(formats.reference_matmul(x, q, s, b, "affine", 4, gs), np.float64)
    y = np.array(y.astype(mx.float32), np.float64).reshape(ref.shape)
    assert np.isfinite(y).all()
    return np.linalg.norm(y - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


@pytest.mark.parametrize("dtype,gs,RT,SK,PF,MT,K", [
    (mx.float16, 64, 1, 2, 1, 3, 768),    # one column tile, odd rows: columns past 3 unused
    (mx.bfloat16, 32, 2, 1, 0, 8, 512),   # a full column tile, two row tiles, no prefetch
    (mx.float16, 128, 1, 2, 2, 5, 768),   # three register sets, two simdgroups
    (mx.bfloat16, 64, 1, 3, 1, 7, 768),   # one step per simdgroup: no slots loaded ahead
])
def test_qmv_fold_rows_on_cpu_emulator(dtype, gs, RT, SK, PF, MT, K, tmp_path):
    """Several rows of x (batched decode): x row g is product column g, its slots loaded a
    step ahead and staged at each step; each row checked on its own."""
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    N = 40
    x, q, s, b = _case(MT, N, K, 4, gs, dtype, seed=MT)
    t, grid, tg, osh, odt, _, _, rows = qmv.fold_plan(dtype, s.dtype, gs, (MT, K), N, RT=RT,
                                                       SK=SK, PF=PF)
    assert dict(t)["MR"] == 8
    y = metal_emulator.emulate([dict(spec=qmv.FOLD_SPEC, inputs=[x, q, s, b, rows],
                                     template=t, grid=grid, threadgroup=tg, output_shapes=osh,
                                     output_dtypes=odt)], tmp_path)[0]
    assert (_row_errors(y, x, q, s, b, gs) < TOL[dtype]).all()


@pytest.mark.parametrize("dtype,gs,RT,SK,PF,K", [
    (mx.float16, 64, 1, 2, 1, 1280),  # two groups a piece (columns 0, 1: lane c = 0 folds)
    (mx.bfloat16, 32, 1, 1, 0, 768),  # four groups a piece: lanes c = 0 and 1 fold, then meet
    (mx.float16, 128, 1, 3, 2, 768),  # one group a piece: column 0 only
    (mx.bfloat16, 64, 1, 2, 1, 1024),
])
def test_qmv_fold_pieces_on_cpu_emulator(dtype, gs, RT, SK, PF, K, tmp_path):
    """One row read as 16-byte pieces (P16): each product column carries one group."""
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    N = 40
    x, q, s, b = _case(1, N, K, 4, gs, dtype, seed=gs + 3 * RT)
    t, grid, tg, osh, odt, _, _, rows = qmv.fold_plan(dtype, s.dtype, gs, (1, K), N, RT=RT,
                                                       SK=SK, PF=PF, P16=1)
    assert dict(t)["P16"] == 1
    y = metal_emulator.emulate([dict(spec=qmv.FOLD_SPEC, inputs=[x, q, s, b, rows], template=t,
                                     grid=grid, threadgroup=tg, output_shapes=osh,
                                     output_dtypes=odt)], tmp_path)[0]
    assert _rel_err(y, x, q, s, b, 4, gs) < TOL[dtype]


def test_qmv_fold_on_emulator_keeps_float_accuracy_with_large_x(tmp_path):
    """x of magnitude 1e3 with an offset: the codes' 1024 offset is removed in float after the
    products, so the result must stay within the output's own rounding (float16)."""
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("needs g++ with C++20 <barrier> and _Float16")
    N, K = 16, 512
    x, q, s, b = _case(1, N, K, 4, 64, mx.float16, seed=7)
    x = (x.astype(mx.float32) * 30 + 20).astype(mx.float16)
    t, grid, tg, osh, odt, _, _, rows = qmv.fold_plan(mx.float16, s.dtype, 64, (1, K), N, SK=2)
    y = metal_emulator.emulate([dict(spec=qmv.FOLD_SPEC, inputs=[x, q, s, b, rows], template=t,
                                     grid=grid, threadgroup=tg, output_shapes=osh,
                                     output_dtypes=odt)], tmp_path)[0]
    assert _rel_err(y, x, q, s, b, 4, 64) < 1e-3


def test_qmv_fold_support_and_config():
    f16, bf16, f32 = mx.float16, mx.bfloat16, mx.float32
    assert qmv.fold_supported(bf16, bf16, 4, 64, 1, 4096)
    assert qmv.fold_supported(f16, bf16, 4, 128, 1, 12288)
    assert qmv.fold_supported(bf16, bf16, 4, 64, 8, 4096)        # up to 8 rows of x
    assert not qmv.fold_supported(bf16, bf16, 4, 64, 9, 4096)
    assert not qmv.fold_supported(f32, f32, 4, 64, 1, 4096)      # 16-bit products
    assert not qmv.fold_supported(bf16, f32, 4, 64, 1, 4096)     # scales read as 16-bit words
    assert not qmv.fold_supported(bf16, bf16, 8, 64, 1, 4096)    # 4-bit codes only
    assert not qmv.fold_supported(bf16, bf16, 4, 64, 1, 4096 + 64)  # whole 256-value steps
    for N, K in ((4096, 4096), (12288, 4096), (4096, 12288), (256, 256), (8192, 28672)):
        RT, SK, PF = qmv.fold_config(N, K)
        assert RT == 1 and 1 <= SK <= min(8, K // 256) and PF in (0, 1, 2)
        assert SK & (SK - 1) == 0  # uneven splits measured slower: a power of two
    assert qmv.fold_config(12288, 4096, gated=True)[:2] == (2, 2)  # gate and up tiles
    assert [qmv.fold_rows_bound(m) for m in (1, 2, 8)] == [1, 8, 8]
    # 16-byte pieces: one row and one row tile only (two tiles measured slower with them)
    for MT, RT, on in ((1, 1, 1), (1, 2, 0), (2, 1, 0)):
        t = dict(qmv.fold_plan(bf16, bf16, 64, (MT, 4096), 4096, RT=RT, P16=1)[0])
        assert t["P16"] == on, (MT, RT)
    assert [qmv.fold_config(12288, 4096, MT=m)[0] for m in (1, 2, 5, 8)] == [1, 2, 2, 2]
    for MT in (1, 8):  # the staged rows fit the threadgroup memory
        for RT in (1, 2):
            RT_, SK, _ = qmv.fold_config(4096, 4096, RT=RT, MT=MT)
            assert qmv.fold_shared_bytes(RT_, SK, qmv.fold_rows_bound(MT)) <= 48 * 1024


def test_qmv_fold_switch_and_selection_tag(monkeypatch):
    """Unset, the folded body is CUDA's default (and Metal's opt-in); =0 / =1 force it. The
    selection's format names it, so a choice timed with one body is not read for the other,
    and the fused decode plans follow the same switch."""
    from marlin_mlx.kernels import fused_linear
    bf16 = mx.bfloat16
    for value, on in ((None, launch._gpu_backend() == "cuda"), (True, True), (False, False)):
        monkeypatch.setattr(qmv, "USE_FOLD", value)
        assert qmv.fold_enabled() is on
        assert qmv.body_tag(bf16, bf16, 4, 64, 1, 4096) == ("-fold" if on else "")
        assert qmv.body_tag(bf16, bf16, 4, 64, 8, 4096) == ("-fold" if on else "")
        assert qmv.body_tag(bf16, bf16, 4, 64, 9, 4096) == ""    # 9 rows: the float body
        assert qmv.body_tag(bf16, bf16, 8, 64, 1, 4096) == ""    # 8 bits: the float body
        spec, _ = fused_linear._plan(fused_linear.SPEC_RES, bf16, bf16, 4, 64, (1, 1, 512), 64,
                                     None)
        assert (spec is fused_linear.FOLD_SPECS[fused_linear.SPEC_RES]) == on
        spec, _ = fused_linear._plan(fused_linear.SPEC_RES, bf16, bf16, 4, 64, (1, 1, 320), 64,
                                     None)
        assert spec is fused_linear.SPEC_RES                     # K % 256 != 0


@pytest.mark.gpu
@pytest.mark.skipif(not launch.backend(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_qmv_fold_gpu_matches_float64(dtype, gs, monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    N, K = 1000, 4096 + 256  # an N tail
    x, q, s, b = _case(1, N, K, 4, gs, dtype, seed=gs)
    y = qmv.qmv_kernel(x, q, s, b, gs, 4, fold=True)
    assert _rel_err(y, x, q, s, b, 4, gs) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not launch.backend(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("RT,SK,PF", [(1, 1, 1), (2, 3, 1), (1, 8, 0), (2, 5, 0), (1, 2, 1),
                                     (1, 2, 2), (2, 3, 2), (1, 1, 2)])
def test_qmv_fold_gpu_tilings(RT, SK, PF, monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    x, q, s, b = _case(1, 12288, 4096 + 256, 4, 64, mx.bfloat16)
    y = qmv.qmv_kernel(x, q, s, b, 64, 4, fold=True, RT=RT, SK=SK, PIPE=None, PF=PF)
    assert _rel_err(y, x, q, s, b, 4, 64) < TOL[mx.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not launch.backend(), reason="needs an MLX GPU backend")
def test_qmv_fold_gpu_leading_dims_and_fallback(monkeypatch):
    """x of shape (MT, 1, K) comes back (MT, 1, N); 9 rows or a ragged K take the float body
    (each checked against the oracle)."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    for MT, K in ((1, 2048), (2, 2048), (9, 2048), (1, 2048 + 64)):
        x, q, s, b = _case(MT, 520, K, 4, 64, mx.bfloat16, seed=MT)
        y = qmv.qmv_kernel(x.reshape(MT, 1, K), q, s, b, 64, 4, fold=True)
        assert y.shape == (MT, 1, 520)
        assert _rel_err(y.reshape(MT, 520), x, q, s, b, 4, 64) < TOL[mx.bfloat16]
        assert np.isfinite(np.array(y.astype(mx.float32))).all()


@pytest.mark.gpu
@pytest.mark.skipif(not launch.backend(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("MT", [2, 3, 5, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_qmv_fold_gpu_rows_match_float64(dtype, MT, gs, monkeypatch):
    """Batched decode rows on the folded body, each row against the float64 oracle."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    x, q, s, b = _case(MT, 1000, 4096 + 256, 4, gs, dtype, seed=MT + gs)
    y = qmv.qmv_kernel(x, q, s, b, gs, 4, fold=True)
    assert (_row_errors(y, x, q, s, b, gs) < TOL[dtype]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not launch.backend(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("MT,RT,SK,PF", [(4, 1, 1, 1), (8, 2, 3, 1), (6, 1, 8, 0),
                                         (8, 2, 4, 2), (5, 1, 2, 2)])
def test_qmv_fold_gpu_rows_tilings(MT, RT, SK, PF, monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    x, q, s, b = _case(MT, 12288, 4096 + 256, 4, 64, mx.bfloat16, seed=MT)
    y = qmv.qmv_kernel(x, q, s, b, 64, 4, fold=True, RT=RT, SK=SK, PF=PF)
    assert (_row_errors(y, x, q, s, b, 64) < TOL[mx.bfloat16]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not launch.backend(), reason="needs an MLX GPU backend")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("gs,RT,SK,PF", [(64, 1, 2, 1), (32, 1, 4, 1), (128, 1, 8, 1),
                                         (64, 1, 3, 0), (32, 1, 1, 2)])
def test_qmv_fold_gpu_pieces(dtype, gs, RT, SK, PF, monkeypatch):
    """One row read as 16-byte pieces (P16) against the float64 oracle."""
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    x, q, s, b = _case(1, 1000, 4096 + 256, 4, gs, dtype, seed=gs + SK)
    y = qmv.qmv_kernel(x, q, s, b, gs, 4, fold=True, RT=RT, SK=SK, PF=PF, P16=1)
    assert _rel_err(y, x, q, s, b, 4, gs) < TOL[dtype]
