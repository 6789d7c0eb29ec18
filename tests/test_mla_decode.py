"""MLA decode fusions (kernels/mla_decode.py): the absorbed-query kernel (per-head embed_q GEMV,
rope query, cache row) and the per-head GEMV of the output side, against float64 NumPy.

CPU: the kernels' Metal renderings run by the emulator (tests/metal_emulator.py), and the MLX
references the model falls back to. GPU (`-m gpu`): the kernels with poisoned outputs, and a
quantized GLM-4.7-Flash-shaped model whose compiled decode steps with the fusions forced on
match MLX's own ops.
"""

import numpy as np
import pytest

import mlx.core as mx

from marlin_mlx.kernels import (formats, fused_linear, launch, mla_decode, moe_experts, moe_router,
                                qk_rope, selection)

gpu = pytest.mark.skipif(launch.backend() is None, reason="needs an MLX GPU backend")
TOL = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 1.5e-2}


def _np(a):
    return np.array(a.astype(mx.float32), np.float64)


def _per_head64(w, s, b, bits, gs):
    """(H, rows, K) float64 from MLX's affine per-head packing."""
    H, rows = w.shape[:2]
    codes = np.array(formats.unpack(w.reshape(H * rows, -1), "affine", bits), np.float64)
    s2, b2 = _np(s).reshape(H * rows, -1), _np(b).reshape(H * rows, -1)
    return (codes * np.repeat(s2, gs, 1) + np.repeat(b2, gs, 1)).reshape(H, rows, -1)


def _rope_pairs64(x, pos, inv_freq, scale):
    """Interleaved RoPE: pairs (2i, 2i + 1) of x (..., D) rotated by pos * inv_freq[i]."""
    x = x * scale
    ang = pos * np.asarray(inv_freq, np.float64)
    c, s = np.cos(ang), np.sin(ang)
    out = x.copy()
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 1::2] * c + x[..., 0::2] * s
    return out


def _q_case(dt, heads, nope, rope, rank, qa, bits=4, gs=64, seed=0):
    mx.random.seed(seed)
    w, s, b = mx.quantize(mx.random.normal((heads, rank, nope)) * 0.1, group_size=gs, bits=bits)
    s, b = s.astype(dt), b.astype(dt)
    q = mx.random.normal((1, 1, heads * (nope + rope))).astype(dt)
    kv = mx.random.normal((1, 1, qa + rank + rope)).astype(dt)
    kvn = (1.0 + 0.2 * mx.random.normal((rank,))).astype(dt)
    pos = mx.array([1234], mx.int32)
    inv = qk_rope.inv_freq_table(rope, base=1e6)
    return (q, kv, w, s, b, kvn, pos, inv)


def _q_ref(case, heads, nope, rope, rank, qa, eps, scale, bits=4, gs=64):
    q, kv, w, s, b, kvn, pos, inv = case
    W = _per_head64(w, s, b, bits, gs)
    qh = _np(q).reshape(heads, nope + rope)
    q_abs = np.einsum("hrk,hk->hr", W, qh[:, :nope])
    p = float(np.array(pos)[0])
    q_pe = _rope_pairs64(qh[:, nope:], p, np.array(inv), scale)
    kv64 = _np(kv).reshape(-1)
    lat = kv64[qa:qa + rank]
    lat = lat / np.sqrt((lat * lat).mean() + eps) * _np(kvn)
    k_pe = _rope_pairs64(kv64[qa + rank:], p, np.array(inv), scale)
    return np.concatenate([q_abs, q_pe], -1), np.concatenate([lat, k_pe])


def _err(y, ref):
    y = _np(y).reshape(ref.shape)
    assert np.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _heads_case(dt, heads, rows, K, bits=4, gs=64, seed=0):
    mx.random.seed(seed)
    w, s, b = mx.quantize(mx.random.normal((heads, rows, K)) * 0.1, group_size=gs, bits=bits)
    return mx.random.normal((1, heads, 1, K)).astype(dt), w, s.astype(dt), b.astype(dt)


def _heads_ref(x, w, s, b, bits=4, gs=64):
    W = _per_head64(w, s, b, bits, gs)
    return np.einsum("hrk,hk->hr", W, _np(x)[0, :, 0]).reshape(-1)


@pytest.mark.parametrize("in_place", [False, True], ids=["row-out", "row-in-cache"])
@pytest.mark.parametrize("scale", [1.0, 1.2])
def test_mla_q_body_on_cpu_emulator(scale, in_place, tmp_path):
    # row-in-cache: mla_q_cache.h, the same body writing the row into the cache input at pos
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("no C++20 g++")
    dt, H, nope, rope, rank, qa, eps = mx.float16, 3, 64, 16, 64, 32, 1e-6
    case = _q_case(dt, H, nope, rope, rank, qa)
    plan = mla_decode._plan_q(dt, dt, 4, 64, H, nope, rope, rank, qa, eps, scale, in_place)
    t, grid, tg, osh, odt = plan[:5]
    q, kv, w, s, b, kvn, pos, inv = case
    inputs, spec, pos_i = [q, w, s, b, kv, kvn, pos, inv], mla_decode.SPEC_Q, int(np.array(pos)[0])
    if in_place:
        cache = mx.random.normal((1, 1, pos_i + 5, rank + rope)).astype(dt)
        inputs, spec = inputs + [cache], mla_decode.SPEC_Q_CACHE
    outs = metal_emulator.emulate([dict(spec=spec, inputs=inputs, template=t, grid=grid,
                                        threadgroup=tg, output_shapes=osh, output_dtypes=odt,
                                        written=[8] if in_place else [])], tmp_path)
    ry, rrow = _q_ref(case, H, nope, rope, rank, qa, eps, scale)
    y, row = outs
    assert y.shape == (1, H, 1, rank + rope)
    if in_place:
        assert len(osh) == 1
        after, before = _np(row), _np(cache)
        row = after[0, 0, pos_i].copy()
        after[0, 0, pos_i] = before[0, 0, pos_i]
        assert np.array_equal(after, before)  # no other row touched
        assert np.linalg.norm(row - rrow) / np.linalg.norm(rrow) < 3e-3
    else:
        assert row.shape == (1, 1, 1, rank + rope) and _err(row, rrow) < 3e-3
    assert _err(y, ry) < 3e-3


def test_qmv_heads_body_on_cpu_emulator(tmp_path):
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("no C++20 g++")
    dt, H, rows, K = mx.bfloat16, 3, 32, 128
    x, w, s, b = _heads_case(dt, H, rows, K)
    t = mla_decode._gemv_template(dt, dt, 4, 64, K, H * rows, (("XH", K), ("RH", rows)))[0]
    R, SK = dict(t)["R"], dict(t)["SK"]
    y = metal_emulator.emulate([dict(spec=mla_decode.SPEC_HEADS, inputs=[x, w, s, b], template=t,
                                     grid=(32 * SK * (H * rows // R), 1, 1),
                                     threadgroup=(32 * SK, 1, 1), output_shapes=[(1, 1, H * rows)],
                                     output_dtypes=[dt])], tmp_path)[0]
    assert _err(y, _heads_ref(x, w, s, b)) < 1e-2


def test_references_match_float64():
    # the MLX-op references (the fallback path and the selection's builtin) are the same math
    H, nope, rope, rank, qa, eps, scale = 2, 64, 16, 64, 32, 1e-6, 1.1
    case = _q_case(mx.float32, H, nope, rope, rank, qa)
    q, kv, w, s, b, kvn, pos, inv = case
    y, row = mla_decode.absorbed_query_reference(q, kv, w, s, b, kvn, pos, inv, heads=H,
                                                 nope=nope, q_lora_rank=qa, eps=eps, scale=scale,
                                                 group_size=64, bits=4)
    ry, rrow = _q_ref(case, H, nope, rope, rank, qa, eps, scale)
    assert _err(y, ry) < 1e-5 and _err(row, rrow) < 1e-5
    x, w, s, b = _heads_case(mx.float32, 3, 32, 128)
    assert _err(mla_decode.heads_linear_reference(x, w, s, b, 64, 4), _heads_ref(x, w, s, b)) < 1e-5


def test_nothing_fuses_on_cpu():
    from marlin_mlx.models.glm4_moe_lite import QuantizedPerHeadLinear
    if launch.backend() is not None:
        pytest.skip("CPU-only check")
    layer = QuantizedPerHeadLinear(128, 64, 2)
    assert mla_decode.heads_linear(layer, mx.zeros((1, 2, 1, 128))) is None


def _split_step(model, tok, cache):
    """One decode step through the layers' attn_in / attend / attn_out split (what the
    compiled step runs), uncompiled, so emulated kernels may evaluate their inputs."""
    x = model.model.embed_tokens(tok)
    offset = mx.array(cache[0].offset, mx.int32)
    for layer, c in zip(model.layers, cache):
        x = layer.attn_out(x, layer.attend(*layer.attn_in(x, offset), c))
    return model.head(model.model.norm(x))


@pytest.mark.parametrize("qb_fused", [True, False], ids=["qb-fused", "qb-mlx-ops"])
def test_glm_fused_step_on_cpu_emulator(qb_fused, monkeypatch, tmp_path):
    # The model-level wiring of the decode fusions, on the CPU: the fused kernels' Metal
    # renderings run by the emulator inside a decode step (q_a|kv_a norm GEMV, q_b prefix norm
    # GEMV, mla_q, per-head unembed, o_proj + residual; the MoE layers' norm + router, experts
    # and down + residual) against the model's own ops, float32.
    import metal_emulator
    if not metal_emulator.available():
        pytest.skip("no C++20 g++")

    launched = []

    def emu_launch(spec, inputs, template, grid, tg, oshapes, odts, kern, ktemplate):
        launched.append(spec.name)
        return metal_emulator.run(spec, inputs, template, grid, tg, oshapes, odts)

    def emu_moe_launch(spec, *args, **kwargs):
        launched.append(spec.name)
        return metal_emulator.run(spec, *args, **kwargs)

    model = _glm()
    model.fuse_projections()
    prompt = mx.array([[1, 5, 9, 100, 31, 7]])
    results = []
    for fused in (False, True):
        monkeypatch.setattr(fused_linear, "ENABLED", fused)
        cache = model.make_cache()
        logits = model(prompt, cache=cache)
        tok = mx.argmax(logits[:, -1], -1, keepdims=True).astype(mx.int32)
        if fused:
            monkeypatch.setenv(selection.ENV_MODE, "custom")
            for mod in (selection, fused_linear, mla_decode, moe_router, moe_experts):
                monkeypatch.setattr(mod, "backend", lambda: "metal")
            for mod in (fused_linear, mla_decode):
                monkeypatch.setattr(mod, "launch_planned", emu_launch)
            if not qb_fused:  # q_b's prefix GEMV declines: mla_q still runs, on q from MLX ops
                norm_linear = fused_linear.norm_linear
                monkeypatch.setattr(fused_linear, "norm_linear", lambda *a, prefix=False: None
                                    if prefix else norm_linear(*a))
            for mod in (moe_router, moe_experts):
                monkeypatch.setattr(mod, "launch", emu_moe_launch)
            for d in (fused_linear._DECISIONS, mla_decode._DECISIONS, moe_router._NORM_PLANS,
                      moe_experts._PATHS):
                d.clear()
        out = _split_step(model, tok, cache)
        mx.eval(out)
        results.append(_np(out))
        monkeypatch.undo()
    plain, fused = results
    # per layer: q_a|kv_a (norm), q_b (prefix norm), mla_q, unembed, o_proj + residual; then
    # in the MoE layers: norm + router GEMV + routing, gate/up (+ shared), down + residual
    attn = ["marlin_qmv_norm"] * (2 if qb_fused else 1) + ["marlin_mla_q", "marlin_qmv_heads",
                                                           "marlin_qmv_res"]
    moe = ["marlin_moe_route_norm", "marlin_moe_gate_up_shared", "marlin_moe_down_shared_res"]
    assert launched == attn + (attn + moe) * (len(model.layers) - 1)
    assert np.argmax(plain[0, -1]) == np.argmax(fused[0, -1])
    assert np.linalg.norm(fused - plain) / np.linalg.norm(plain) < 1e-4


# ------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dt", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_mla_q_kernel_gpu(dt, bits, poison):
    H, nope, rope, rank, qa, eps, scale = 20, 192, 64, 512, 768, 1e-6, 1.0
    case = _q_case(dt, H, nope, rope, rank, qa, bits=bits, seed=np.random.randint(1 << 20))
    y, row = mla_decode.absorbed_query_kernel(*case, heads=H, nope=nope, q_lora_rank=qa,
                                              eps=eps, scale=scale, group_size=64, bits=bits)
    ry, rrow = _q_ref(case, H, nope, rope, rank, qa, eps, scale, bits=bits)
    assert y.dtype == dt and row.dtype == dt
    assert _err(y, ry) < TOL[dt] and _err(row, rrow) < TOL[dt]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dt", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_qmv_heads_kernel_gpu(dt, bits, poison):
    x, w, s, b = _heads_case(dt, 20, 256, 512, bits=bits, seed=np.random.randint(1 << 20))
    y = mla_decode.heads_linear_kernel(x, w, s, b, 64, bits)
    assert y.shape == (1, 1, 20 * 256) and y.dtype == dt
    assert _err(y, _heads_ref(x, w, s, b, bits=bits)) < TOL[dt]


def _glm(seed=5):
    """A small GLM-4.7-Flash-shaped model, 4-bit (g64), float32, sized for the fused kernels
    (no-rope and latent widths multiples of the group size)."""
    from mlx.utils import tree_flatten, tree_unflatten

    from marlin_mlx.kernels import quantize_modules
    from marlin_mlx.models import glm4_moe_lite
    model = glm4_moe_lite.Model(glm4_moe_lite.ModelArgs.from_config(dict(
        vocab_size=128, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=64, kv_lora_rank=64,
        qk_nope_head_dim=64, qk_rope_head_dim=16, v_head_dim=32, routed_scaling_factor=1.8,
        norm_topk_prob=True, max_position_embeddings=256, rope_theta=1e6,
        first_k_dense_replace=1)))
    mx.random.seed(seed)
    model.update(tree_unflatten([(k, 0.1 * mx.random.normal(v.shape))
                                 for k, v in tree_flatten(model.parameters())]))
    quantize_modules(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


@pytest.mark.gpu
@gpu
def test_glm_decode_step_fused_equals_unfused(monkeypatch, tmp_path):
    # A 4-bit float32 GLM-4.7-Flash-shaped model's compiled decode steps with the MLA fusions
    # forced on (fused q_a|kv_a, mla_q, per-head unembed, o_proj + residual) against the same
    # step with them off; every other kernel (MoE, router, paged attention) is forced custom in
    # both runs, so only the fusions differ.
    from parity import assert_same_steps, compiled_steps
    monkeypatch.setenv("MARLIN_MLX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(selection.ENV_MODE, "custom")
    prompt = mx.array([[1, 5, 9, 100, 31, 7]])

    def decode(fused: bool):
        monkeypatch.setattr(fused_linear, "ENABLED", fused)
        for d in (fused_linear._DECISIONS, mla_decode._DECISIONS):
            d.clear()
        model = _glm()
        outs = compiled_steps(model, prompt)
        assert "qkv_a_proj" in model.layers[0].self_attn
        return outs

    assert_same_steps(decode(True), decode(False))


@pytest.mark.gpu
@pytest.mark.skipif(launch.backend() != "cuda", reason="the in-place row write runs on CUDA")
@pytest.mark.parametrize("dt", [mx.bfloat16, mx.float32])
def test_mla_q_writes_the_cache_row_in_place_gpu(dt, poison):
    H, nope, rope, rank, qa, eps, scale = 20, 192, 64, 512, 768, 1e-6, 1.0
    case = _q_case(dt, H, nope, rope, rank, qa, seed=np.random.randint(1 << 20))
    cap, pos = 1536, int(np.array(case[6])[0])
    cache = mx.random.normal((1, 1, cap, rank + rope)).astype(dt)
    mx.eval(cache)
    before = _np(cache).copy()
    y, row = mla_decode.absorbed_query_kernel(*case, heads=H, nope=nope, q_lora_rank=qa, eps=eps,
                                              scale=scale, group_size=64, bits=4, cache=cache)
    mx.eval(y)
    assert row is None
    ry, rrow = _q_ref(case, H, nope, rope, rank, qa, eps, scale)
    after = _np(cache)
    row_err = np.linalg.norm(after[0, 0, pos] - rrow) / np.linalg.norm(rrow)
    assert _err(y, ry) < TOL[dt] and row_err < TOL[dt]
    after[0, 0, pos] = before[0, 0, pos]
    assert np.array_equal(after, before)  # no other row touched


@pytest.mark.gpu
@gpu
def test_glm_whole_step_rows_in_place_equal_slice_updates(monkeypatch, tmp_path):
    # The compiled whole step with mla_q writing each row into the latent cache (CUDA) against
    # the same step writing it by slice update; small cache steps make the buffer grow (and the
    # step retrace) while decoding.
    from marlin_mlx.generation import decode_forward
    from marlin_mlx.models import cache as kv_cache
    monkeypatch.setenv("MARLIN_MLX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(selection.ENV_MODE, "custom")
    model = _glm()
    prompt = mx.array([[1, 5, 9, 100, 31, 7]])
    runs = []
    for in_place in (True, False):
        monkeypatch.setattr(kv_cache, "IN_PLACE_ROWS", in_place)
        model.__dict__.pop("_compiled_decoder", None)
        step, cache = decode_forward(model, compile=True), model.make_cache()
        for c in cache:
            c.step = 4
        logits, outs = model(prompt, cache=cache), []
        for _ in range(9):
            tok = mx.argmax(logits[:, -1], -1, keepdims=True).astype(mx.int32)
            logits = step(tok, cache=cache)
            mx.eval(logits)
            outs.append(_np(logits))
        assert step.failed is None and step._wholes
        runs.append((outs, [_np(c.state[0]) for c in cache]))
    (a, ca), (b, cb) = runs
    for x, y in zip(a + ca, b + cb):
        assert np.array_equal(x, y)
