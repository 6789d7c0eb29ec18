"""The decode-step fusions: RMSNorm in front of / residual add behind a quantized GEMV
(kernels.fused_linear) and the q/k/v split + q/k norm + RoPE kernel (kernels.qk_rope).

CPU: the kernels' Metal renderings run by the emulator (tests/metal_emulator.py) against
float64 NumPy references, and the models' decode path unchanged where nothing fuses.
GPU (`-m gpu`): the CUDA/Metal kernels against the same references with poisoned outputs, and
a quantized Llama/Qwen3 decode step with the fusions against MLX's own ops.
"""

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import formats, fused_linear, launch, qk_rope
from marlin_mlx.kernels import selection

TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}
gpu = pytest.mark.skipif(launch.backend() is None, reason="needs an MLX GPU backend")


def _np(a):
    return np.array(a.astype(mx.float32), np.float64)


def _affine64(q, s, b, bits, gs):
    codes = np.array(formats.unpack(q, "affine", bits), np.float64)
    return codes * np.repeat(_np(s), gs, 1) + np.repeat(_np(b), gs, 1)


def _rmsnorm64(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope64(x, pos, inv_freq):
    """x (..., D) at positions pos (broadcast against x's leading dims), HF half-split layout."""
    half = x.shape[-1] // 2
    ang = pos[..., None] * inv_freq
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _err(y, ref):
    y = _np(y).reshape(ref.shape)
    assert np.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _case(op, dt, N=40, K=320, bits=4, gs=64, seed=0, M=1):
    mx.random.seed(seed)
    n_w = 2 if op == "gated_norm" else 1
    ws = [mx.quantize(mx.random.normal((N, K)), group_size=gs, bits=bits) for _ in range(n_w)]
    ws = [(q, s.astype(dt), b.astype(dt)) for q, s, b in ws]
    x = (mx.random.normal((M, K)) * (1 + mx.arange(M)[:, None])).astype(dt)  # rows' own rms
    nw = (1.0 + 0.2 * mx.random.normal((K,))).astype(dt)
    res = mx.random.normal((M, N)).astype(dt)
    x64, W = _np(x), [_affine64(*w, bits, gs) for w in ws]
    if op == "qmv_norm":
        ref = _rmsnorm64(x64, _np(nw), 1e-5) @ W[0].T
        inputs = [x, *ws[0], nw]
    elif op == "qmv_res":
        ref = _np(res) + x64 @ W[0].T
        inputs = [x, *ws[0], res]
    else:
        n = _rmsnorm64(x64, _np(nw), 1e-5)
        g, u = n @ W[0].T, n @ W[1].T
        ref = g / (1 + np.exp(-g)) * u
        inputs = [x, *ws[0], *ws[1], nw]
    return inputs, ref


SPECS = {"qmv_norm": fused_linear.SPEC_NORM, "qmv_res": fused_linear.SPEC_RES,
         "gated_norm": fused_linear.SPEC_GATED_NORM}


@pytest.mark.parametrize("op", list(SPECS))
@pytest.mark.parametrize("dt", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("fold", [False, True])
def test_fused_gemv_bodies_on_cpu_emulator(op, dt, fold, tmp_path, monkeypatch):
    """Both bodies: the float one (K = 320, a ragged step) and the folded tensor-core one
    (K = 768: three 256-value steps over two simdgroups)."""
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("no C++20 g++")
    monkeypatch.setattr(fused_linear._qmv, "USE_FOLD", fold)
    K = 768 if fold else 320
    inputs, ref = _case(op, dt, K=K)
    eps = None if op == "qmv_res" else 1e-5
    spec, plan = fused_linear._plan(SPECS[op], dt, dt, 4, 64, (1, K), 40, eps)
    t, grid, tg, osh, odt = plan[:5]
    assert (spec is fused_linear.FOLD_SPECS[SPECS[op]]) == fold
    y = metal_emulator.emulate([dict(spec=spec, inputs=inputs + list(plan[7:]), template=t,
                                     grid=grid,
                                     threadgroup=tg, output_shapes=osh, output_dtypes=odt)],
                               tmp_path)[0]
    assert _err(y, ref) < TOL[dt] * 2


@pytest.mark.parametrize("op", list(SPECS))
@pytest.mark.parametrize("dt,M,gs", [(mx.bfloat16, 5, 64), (mx.float16, 8, 32)])
def test_fused_fold_rows_on_cpu_emulator(op, dt, M, gs, tmp_path, monkeypatch):
    """Batched decode rows through the folded fused variants: each row's own norm (rows of
    different rms), residual row and gate/up product, every row checked on its own."""
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("no C++20 g++")
    monkeypatch.setattr(fused_linear._qmv, "USE_FOLD", True)
    K = 768
    inputs, ref = _case(op, dt, K=K, gs=gs, M=M, seed=M)
    eps = None if op == "qmv_res" else 1e-5
    spec, plan = fused_linear._plan(SPECS[op], dt, dt, 4, gs, (M, K), 40, eps)
    t, grid, tg, osh, odt, _, _, rows = plan
    assert spec is fused_linear.FOLD_SPECS[SPECS[op]]
    y = metal_emulator.emulate([dict(spec=spec, inputs=inputs + [rows], template=t, grid=grid,
                                     threadgroup=tg, output_shapes=osh, output_dtypes=odt)],
                               tmp_path)[0]
    for m in range(M):
        assert _err(y[m], ref[m]) < TOL[dt] * 2, m


def _qkv_case(dt, B, H, KV, D, norm, seed=0):
    mx.random.seed(seed)
    qkv = mx.random.normal((B, 1, (H + 2 * KV) * D)).astype(dt)
    qn = (1.0 + 0.2 * mx.random.normal((D,))).astype(dt)
    kn = (1.0 + 0.2 * mx.random.normal((D,))).astype(dt)
    return qkv, (qn if norm else None), (kn if norm else None)


def _qkv_ref(qkv, qn, kn, B, H, KV, D, pos, inv_freq, eps, scale):
    a = _np(qkv).reshape(B, H + 2 * KV, D)
    q, k, v = a[:, :H], a[:, H:H + KV], a[:, H + KV:]
    if qn is not None:
        q, k = _rmsnorm64(q, _np(qn), eps), _rmsnorm64(k, _np(kn), eps)
    p = np.asarray(pos, np.float64).reshape(-1, 1)  # (B or 1, 1): per row
    inv = np.array(inv_freq, np.float64)
    return _rope64(q * scale, p, inv), _rope64(k * scale, p, inv), v


@pytest.mark.parametrize("norm,per_row,scale", [(True, False, 1.0), (False, True, 1.25)])
def test_qk_rope_body_on_cpu_emulator(norm, per_row, scale, tmp_path):
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("no C++20 g++")
    B, H, KV, D, dt = 2, 3, 1, 64, mx.float16
    qkv, qn, kn = _qkv_case(dt, B, H, KV, D, norm)
    pos = mx.array([5, 1000] if per_row else [77], dtype=mx.int32)
    inv = qk_rope.inv_freq_table(D, base=10000.0)
    t, grid, tg, osh, odt, _, _ = qk_rope._plan(dt, B, H, KV, D, norm, per_row, 1e-6, scale)
    q, k, v = metal_emulator.emulate([dict(spec=qk_rope.SPEC, inputs=[qkv, qn if norm else qkv,
                                                                       kn if norm else qkv, pos,
                                                                       inv],
                                           template=t, grid=grid, threadgroup=tg,
                                           output_shapes=osh, output_dtypes=odt)], tmp_path)
    rq, rk, rv = _qkv_ref(qkv, qn, kn, B, H, KV, D, np.array(pos), np.array(inv), 1e-6, scale)
    assert q.shape == (B, H, 1, D) and k.shape == (B, KV, 1, D) and v.shape == (B, KV, 1, D)
    assert _err(q, rq[:, :, None]) < 3e-3 and _err(k, rk[:, :, None]) < 3e-3
    assert _err(v, rv[:, :, None]) == 0.0


def test_qk_rope_cache_body_on_cpu_emulator(tmp_path):
    # qk_rope_cache.h: the same body writing k and v into row pos of the cache buffers (B, KV,
    # capacity, D), in place; q is the only output and no other row changes
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("no C++20 g++")
    B, H, KV, D, dt, cap, p = 2, 4, 2, 64, mx.bfloat16, 13, 9
    qkv, qn, kn = _qkv_case(dt, B, H, KV, D, True)
    pos = mx.array([p], dtype=mx.int32)
    inv = qk_rope.inv_freq_table(D, base=10000.0)
    kb = mx.random.normal((B, KV, cap, D)).astype(dt)
    vb = mx.random.normal((B, KV, cap, D)).astype(dt)
    t, grid, tg, osh, odt, _, _ = qk_rope._plan(dt, B, H, KV, D, True, False, 1e-6, 1.0, True)
    assert len(osh) == 1
    q, k_after, v_after = metal_emulator.emulate([dict(
        spec=qk_rope.SPEC_CACHE, inputs=[qkv, qn, kn, pos, inv, kb, vb,
                                         mx.array([cap], dtype=mx.int32)],
        template=t, grid=grid, threadgroup=tg, output_shapes=osh, output_dtypes=odt,
        written=[5, 6])], tmp_path)
    rq, rk, rv = _qkv_ref(qkv, qn, kn, B, H, KV, D, np.array(pos), np.array(inv), 1e-6, 1.0)
    assert _err(q, rq[:, :, None]) < 1e-2
    for after, before, ref in ((k_after, kb, rk), (v_after, vb, rv)):
        a, b = _np(after), _np(before)
        assert _err(mx.array(a[:, :, p]), ref) < 1e-2
        a[:, :, p] = b[:, :, p]
        assert np.array_equal(a, b)  # no other row touched


def test_reference_matches_float64():
    # the MLX-op reference (the CPU path and the selection's builtin) is the same math
    B, H, KV, D = 2, 4, 2, 64
    qkv, qn, kn = _qkv_case(mx.float32, B, H, KV, D, True)
    pos = mx.array([3, 300], dtype=mx.int32)
    q, k, v = qk_rope.reference(qkv, H, KV, D, pos, 1e6, None, qn, kn, 1e-6, 1.0)
    inv = qk_rope.inv_freq_table(D, base=1e6)
    rq, rk, rv = _qkv_ref(qkv, qn, kn, B, H, KV, D, np.array(pos), np.array(inv), 1e-6, 1.0)
    assert _err(q, rq[:, :, None]) < 1e-5 and _err(k, rk[:, :, None]) < 1e-5
    assert _err(v, rv[:, :, None]) == 0.0


def test_nothing_fuses_on_cpu():
    # the CPU backend keeps MLX's ops: the fusions decline, the models run their own path
    from marlin_mlx.kernels import QuantizedLinear
    if launch.backend() is not None:
        pytest.skip("CPU-only check")
    lin = QuantizedLinear(128, 64)
    x = mx.zeros((1, 1, 128))
    assert fused_linear.norm_linear(x, mx.ones((128,)), 1e-6, lin) is None
    assert fused_linear.linear_residual(x, lin, mx.zeros((1, 1, 64))) is None
    assert fused_linear.norm_swiglu(x, mx.ones((128,)), 1e-6, lin, lin) is None
    assert not qk_rope.use_kernel(mx.zeros((1, 1, 4 * 64)), 2, 1, 64, 0, 1e4, None)


def test_selection_inputs_have_the_layer_shapes(monkeypatch):
    # What the first-use selection would time and check on a GPU, run here through MLX's ops:
    # inputs of the layer's real shapes (x of K values, not of the packed words), and the
    # built-in composition agreeing with the float32 reference.
    from marlin_mlx.kernels import QuantizedLinear
    seen = []

    def fake_use_custom(op, fmt, cls, make_inputs, custom, builtin, reference, tol, margin=1.0):
        inputs = make_inputs()
        err = selection.rel_err(builtin(*inputs), reference(*inputs))
        seen.append((op, cls, inputs[0].shape, err))
        return False

    monkeypatch.setattr(selection, "use_custom", fake_use_custom)
    monkeypatch.setattr(fused_linear, "_rows_ok", lambda x, layer, k=None: True)
    monkeypatch.setattr(fused_linear, "_DECISIONS", {})
    monkeypatch.setattr(qk_rope, "_DECISIONS", {})
    K, N, gs = 96, 40, 32
    lin = QuantizedLinear(K, N, False, gs, 4)
    x = mx.random.normal((1, 1, K))
    assert fused_linear.norm_linear(x, mx.ones((K,)), 1e-6, lin) is None
    assert fused_linear.linear_residual(x, lin, mx.zeros((1, 1, N))) is None
    assert fused_linear.norm_swiglu(x, mx.ones((K,)), 1e-6, lin, lin) is None
    monkeypatch.setattr(qk_rope, "backend", lambda: "cuda")
    assert not qk_rope.use_kernel(mx.zeros((2, 1, 4 * 64)), 2, 1, 64, mx.array([3, 4]), 1e4,
                                  None, mx.ones((64,)))
    assert [s[0] for s in seen] == ["qmv_norm", "qmv_res", "gated_norm", "qk_rope"]
    for op, cls, xshape, err in seen:
        assert xshape[-1] == (4 * 64 if op == "qk_rope" else K), (op, cls, xshape)
        assert err < 1e-5, (op, err)


def test_eps_bits_round_trip():
    import struct
    for eps in (1e-6, 1e-5, 1.0, 1.25):
        bits = fused_linear.eps_bits(eps)
        assert 0 < bits < 2**31
        assert struct.unpack("<f", struct.pack("<i", bits))[0] == np.float32(eps)


# ------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op", list(SPECS))
@pytest.mark.parametrize("dt", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("bits", [4, 8, 3])
@pytest.mark.parametrize("fold", [False, True])
def test_fused_gemv_kernels_gpu(op, dt, bits, fold, poison, monkeypatch):
    """fold: the folded tensor-core body where it covers the launch (4 bits, 16-bit x); the
    float body otherwise."""
    if fold and (bits != 4 or dt == mx.float32):
        pytest.skip("the folded body takes 4-bit codes and 16-bit x")
    monkeypatch.setattr(fused_linear._qmv, "USE_FOLD", fold)
    N, K = 300, 64 * 40
    inputs, ref = _case(op, dt, N=N, K=K, bits=bits, seed=np.random.randint(1 << 20))
    if op == "qmv_norm":
        y = fused_linear.qmv_norm_kernel(*inputs[:4], inputs[4], 1e-5, 64, bits)
    elif op == "qmv_res":
        y = fused_linear.qmv_res_kernel(*inputs, 64, bits)
    else:
        y = fused_linear.gated_norm_kernel(inputs[0], tuple(inputs[1:4]), tuple(inputs[4:7]),
                                           inputs[7], 1e-5, 64, bits)
    assert y.shape == (1, N) and y.dtype == dt
    assert _err(y, ref) < TOL[dt] * (2 if op != "qmv_res" else 1)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op", list(SPECS))
@pytest.mark.parametrize("dt", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("M", [2, 5, 8])
def test_fused_fold_rows_gpu(op, dt, M, poison, monkeypatch):
    """The folded fused variants over a batched decode step's rows, each row on its own."""
    monkeypatch.setattr(fused_linear._qmv, "USE_FOLD", True)
    N, K = 300, 64 * 40
    inputs, ref = _case(op, dt, N=N, K=K, seed=np.random.randint(1 << 20), M=M)
    x = inputs[0].reshape(M, 1, K)  # a decode step's (batch, 1, hidden)
    if op == "qmv_norm":
        y = fused_linear.qmv_norm_kernel(x, *inputs[1:4], inputs[4], 1e-5, 64, 4)
    elif op == "qmv_res":
        y = fused_linear.qmv_res_kernel(x, *inputs[1:4], inputs[4].reshape(M, 1, N), 64, 4)
    else:
        y = fused_linear.gated_norm_kernel(x, tuple(inputs[1:4]), tuple(inputs[4:7]),
                                           inputs[7], 1e-5, 64, 4)
    assert y.shape == (M, 1, N) and y.dtype == dt
    for m in range(M):
        assert _err(y[m], ref[m]) < TOL[dt] * 2, m


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dt", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("B,norm,per_row,scale,D", [(1, True, False, 1.0, 128),
                                                    (5, False, True, 1.1, 128),
                                                    (3, True, True, 1.0, 64)])
def test_qk_rope_kernel_gpu(dt, B, norm, per_row, scale, D, poison):
    H, KV = 8, 2
    qkv, qn, kn = _qkv_case(dt, B, H, KV, D, norm, seed=np.random.randint(1 << 20))
    pos = mx.array(list(range(7, 7 + 997 * B, 997)) if per_row else [8191], dtype=mx.int32)
    inv = qk_rope.inv_freq_table(D, base=1e6)
    q, k, v = qk_rope.qk_norm_rope(qkv, H, KV, D, pos, inv, qn, kn, 1e-6, scale)
    rq, rk, rv = _qkv_ref(qkv, qn, kn, B, H, KV, D, np.array(pos), np.array(inv), 1e-6, scale)
    tol = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 1.5e-2}[dt]
    assert _err(q, rq[:, :, None]) < tol and _err(k, rk[:, :, None]) < tol
    assert _err(v, rv[:, :, None]) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(launch.backend() != "cuda", reason="the in-place row write runs on CUDA")
@pytest.mark.parametrize("dt", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("B,norm", [(1, True), (3, False)])
def test_qk_rope_writes_cache_rows_in_place_gpu(dt, B, norm, poison):
    H, KV, D, cap, p = 32, 8, 128, 768, 700
    qkv, qn, kn = _qkv_case(dt, B, H, KV, D, norm, seed=np.random.randint(1 << 20))
    pos = mx.array([p], dtype=mx.int32)
    inv = qk_rope.inv_freq_table(D, base=1e6)
    kb = mx.random.normal((B, KV, cap, D)).astype(dt)
    vb = mx.random.normal((B, KV, cap, D)).astype(dt)
    mx.eval(kb, vb)
    kb0, vb0 = _np(kb).copy(), _np(vb).copy()
    q, k, v = qk_rope.qk_norm_rope(qkv, H, KV, D, pos, inv, qn if norm else None,
                                   kn if norm else None, 1e-6, 1.0,
                                   cache=(kb, vb, mx.array([cap], dtype=mx.int32)))
    mx.eval(q)
    assert k is None and v is None
    rq, rk, rv = _qkv_ref(qkv, qn if norm else None, kn, B, H, KV, D, np.array(pos),
                          np.array(inv), 1e-6, 1.0)
    tol = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 1.5e-2}[dt]
    assert _err(q, rq[:, :, None]) < tol
    for after, before, ref in ((_np(kb), kb0, rk), (_np(vb), vb0, rv)):
        assert np.linalg.norm(after[:, :, p] - ref) / np.linalg.norm(ref) < tol
        after[:, :, p] = before[:, :, p]
        assert np.array_equal(after, before)  # no other row touched


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_decode_step_fused_equals_mlx_ops(arch, make_checkpoint, monkeypatch, tmp_path):
    # A 4-bit float32 model's compiled decode steps with every fusion forced on against MLX's
    # own ops (fusions off, MLX's kernels): same greedy tokens, logits within float32 rounding.
    # (In bfloat16 the two paths round at different places: a few % on this random model, which
    # flips near-tied argmaxes.)
    from marlin_mlx.kernels import quantize_modules
    from marlin_mlx.loader import load_model
    from parity import assert_same_steps, compiled_steps
    monkeypatch.setenv("MARLIN_MLX_CACHE_DIR", str(tmp_path))
    path = make_checkpoint(arch, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64)
    prompt = mx.array([[1, 5, 9, 200, 31, 7]])

    def decode(fused: bool):
        monkeypatch.setattr(fused_linear, "ENABLED", fused)
        monkeypatch.setenv(selection.ENV_MODE, "custom" if fused else "builtin")
        for d in (fused_linear._DECISIONS, qk_rope._DECISIONS):
            d.clear()
        model, _ = load_model(path)
        quantize_modules(model, group_size=64, bits=4)
        mx.eval(model.parameters())
        return compiled_steps(model, prompt)

    assert_same_steps(decode(True), decode(False))
