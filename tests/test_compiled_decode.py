"""The compiled decode step (models.base.CompiledDecoder) and the fused q/k/v projection give
the plain model's outputs, step after step, for Llama, Qwen3, Qwen3-MoE and GLM-4.7-Flash,
float and 4-bit."""

import mlx.core as mx
import pytest

from marlin_mlx.generation import decode_forward, stream_generate
from marlin_mlx.kernels import QuantizedLinear, launch, quantize_modules
from marlin_mlx.loader import load, load_model
from marlin_mlx.models.base import CompiledDecoder, fuse_linears
from mlx.utils import tree_unflatten

STEPS = 6


def _decode(forward, model, prompt, steps=STEPS, cache=None):
    """Logits of `steps` greedy single-token steps after prefilling `prompt` (1-D ids)."""
    cache = model.make_cache() if cache is None else cache
    logits = model(prompt[None], cache=cache)
    y = mx.argmax(logits[:, -1], axis=-1)
    out = []
    for _ in range(steps):
        logits = forward(y[:, None], cache=cache)
        out.append(logits)
        y = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(y, logits)
    return out


def _fresh(path, quantize):
    model, _ = load_model(path)
    if quantize:
        quantize_modules(model, group_size=32, bits=4)
        mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "4bit"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_step_matches_plain_model(make_checkpoint, arch, quantize):
    path = make_checkpoint(arch)
    model = _fresh(path, quantize)
    prompt = mx.array([3, 17, 5, 9, 40, 2, 11], mx.int32)
    plain = _decode(model, model, prompt)

    assert model.fuse_projections() == len(model.layers)
    attn = model.layers[0].self_attn
    assert "qkv_proj" in attn and "q_proj" not in attn
    if quantize:
        assert type(attn.qkv_proj) is QuantizedLinear
    fused = _decode(model, model, prompt)
    dec = model.compiled_decoder()
    assert isinstance(dec, CompiledDecoder) and model.compiled_decoder() is dec
    compiled = _decode(dec, model, prompt)
    for a, b, c in zip(plain, fused, compiled):
        assert a.shape == c.shape
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()
        assert mx.allclose(a, c, rtol=1e-5, atol=1e-5).item()


def test_compiled_step_with_sliding_window(make_checkpoint):
    # windows shorter than the context: the masked attention stays outside the compiled parts
    path = make_checkpoint("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = _fresh(path, False)
    assert any(layer.self_attn.window == 4 for layer in model.layers)
    prompt = mx.array([5, 6, 7, 8, 9, 10], mx.int32)
    plain = _decode(model, model, prompt, steps=8)
    compiled = _decode(decode_forward(model, True), model, prompt, steps=8)
    for a, c in zip(plain, compiled):
        assert mx.allclose(a, c, rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("whole", [True, False], ids=["whole-step", "per-layer"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_whole_step_over_kv_buffers(make_checkpoint, arch, whole, monkeypatch):
    # KVCache attending through the buffer op (the GPU default where measured; on the CPU its
    # MLX reference) lets the whole step compile as one function: the write is a slice update
    # at an array position and the attention masks by a length array. Small cache steps make
    # the buffers grow (and the step retrace) during decode.
    from marlin_mlx.models import base
    from marlin_mlx.models.cache import KVCache
    model = _fresh(make_checkpoint(arch), True)
    prompt = mx.array([3, 17, 5, 9, 40, 2, 11], mx.int32)

    def run(forward, attention):
        monkeypatch.setattr(KVCache, "decode_attention", attention)
        cache = model.make_cache()
        for c in cache:
            c.step = 4
        return _decode(forward, model, prompt, steps=12, cache=cache), cache

    plain, pc = run(model, "sdpa")
    assert not any(c.traced_decode for c in pc)
    monkeypatch.setattr(base, "WHOLE_STEP", whole)
    dec = decode_forward(model, True)
    compiled, cc = run(dec, "buffers")
    assert dec.failed is None and bool(dec._wholes) == whole
    assert all(c.traced_decode for c in cc)
    for a, c in zip(plain, compiled):
        assert mx.allclose(a, c, rtol=1e-5, atol=1e-5).item()
    for a, c in zip(pc, cc):
        assert c.offset == a.offset == len(prompt) + 12 and c.keys.shape == a.keys.shape
        assert mx.array_equal(c.state[0], a.state[0]).item()
        assert mx.array_equal(c.state[1], a.state[1]).item()


def test_kv_buffers_stay_per_layer_with_sliding_windows(make_checkpoint, monkeypatch):
    # a windowed layer attends through MLX's masked SDPA, so its cache cannot be traced and the
    # step keeps the per-layer split
    from marlin_mlx.models.cache import KVCache
    monkeypatch.setattr(KVCache, "decode_attention", "buffers")
    path = make_checkpoint("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = _fresh(path, False)
    prompt = mx.array([5, 6, 7, 8, 9, 10], mx.int32)
    plain = _decode(model, model, prompt, steps=6)
    dec = decode_forward(model, True)
    cache = model.make_cache()
    compiled = _decode(dec, model, prompt, steps=6, cache=cache)
    assert not dec._wholes and dec.failed is None
    assert [c.traced_decode for c in cache] == [layer.self_attn.window is None
                                                for layer in model.layers]
    for a, c in zip(plain, compiled):
        assert mx.allclose(a, c, rtol=1e-5, atol=1e-5).item()


def test_kv_buffers_hand_long_contexts_to_sdpa(make_checkpoint, monkeypatch):
    # "auto": past BUFFER_MAX_TOKENS cached tokens the cache attends through MLX's SDPA again,
    # and the whole step gives way to the per-layer split (forced "buffers" keeps the kernel)
    from marlin_mlx.kernels import buffer_attention
    from marlin_mlx.models import cache as kv_cache
    monkeypatch.setattr(kv_cache, "KV_DECODE", "auto")
    monkeypatch.setattr(kv_cache, "BUFFER_MAX_TOKENS", 10)
    monkeypatch.setattr(buffer_attention, "use_kernel", lambda *a: True)
    monkeypatch.setattr(buffer_attention, "buffer_attention",
                        lambda q, k, v, lens, scale, kernel: buffer_attention.reference(
                            q, k, v, lens, scale))
    model = _fresh(make_checkpoint("qwen3"), False)
    prompt = mx.array([3, 17, 5, 9, 40, 2, 11], mx.int32)
    plain = _decode(model, model, prompt, steps=8)
    dec = decode_forward(model, True)
    cache = model.make_cache()
    seen = []
    logits = model(prompt[None], cache=cache)
    out = []
    for _ in range(8):
        y = mx.argmax(logits[:, -1], axis=-1)
        logits = dec(y[:, None], cache=cache)
        mx.eval(logits)
        out.append(logits)
        seen.append((cache[0].offset, cache[0].traced_decode, cache[0].attends_buffers))
    assert dec._wholes and dec.failed is None
    assert [t for o, t, _ in seen if o >= 10] == [False] * sum(o >= 10 for o, _, _ in seen)
    assert seen[-1][2] is None and seen[0][2] == "kernel"
    for a, c in zip(plain, out):
        assert mx.allclose(a, c, rtol=1e-5, atol=1e-5).item()


def test_kv_rows_in_place_only_on_an_exclusive_buffer():
    from marlin_mlx.models.cache import KVCache
    c = KVCache(step=4)
    c.update_and_fetch(mx.zeros((1, 2, 3, 8)), mx.zeros((1, 2, 3, 8)))
    assert c.rows_in_place and c.trace_key()[-1] is True
    c.trim(1)
    assert not c.rows_in_place
    keys, values, cap = c.trace_inputs()  # offset 2 -> 3 fits: same buffers
    assert not c.rows_in_place and cap.tolist() == [4] and keys.shape[2] == 4
    c.update_and_fetch(mx.zeros((1, 2, 3, 8)), mx.zeros((1, 2, 3, 8)))  # grows: new buffers
    assert c.rows_in_place and c.keys.shape[2] >= 5


@pytest.mark.gpu
@pytest.mark.skipif(launch.backend() is None, reason="needs an MLX GPU backend")
def test_whole_step_kv_rows_in_place_equal_slice_updates(make_checkpoint, monkeypatch, tmp_path):
    # The whole compiled step over KVCache buffers with the rope kernel writing k and v in place
    # (CUDA) against the same step writing them by slice update (bitwise equal), and against
    # MLX's SDPA per layer (close); small cache steps make the buffers grow during decode.
    import numpy as np
    from marlin_mlx.kernels import selection
    from marlin_mlx.models import cache as kv_cache
    monkeypatch.setenv("MARLIN_MLX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(selection.ENV_MODE, "custom")
    path = make_checkpoint("qwen3", hidden_size=256, intermediate_size=512,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    model = _fresh(path, True)
    model.fuse_projections()
    prompt = mx.array([1, 5, 9, 100, 31, 7], mx.int32)
    runs = []
    for in_place, how in ((True, "auto"), (False, "auto"), (True, "sdpa")):
        monkeypatch.setattr(kv_cache, "IN_PLACE_ROWS", in_place)
        monkeypatch.setattr(kv_cache, "KV_DECODE", how)
        model.__dict__.pop("_compiled_decoder", None)
        dec, cache = decode_forward(model, True), model.make_cache()
        for c in cache:
            c.step = 4
        out = _decode(dec, model, prompt, steps=9, cache=cache)
        assert dec.failed is None and bool(dec._wholes) == (how == "auto")
        runs.append(([np.array(a.astype(mx.float32)) for a in out],
                     [np.array(c.state[0].astype(mx.float32)) for c in cache]))
    (a, ca), (b, cb), (c, cc) = runs
    for x, y in zip(a + ca, b + cb):
        assert np.array_equal(x, y)
    for x, y in zip(a, c):
        assert np.linalg.norm(x - y) / np.linalg.norm(y) < 2e-2


def test_generation_same_tokens_with_and_without_compile(make_checkpoint):
    path = make_checkpoint("qwen3")
    runs = []
    for compile in (False, True):
        model, tokenizer = load(path)
        runs.append([(r.token, r.logprobs) for r in stream_generate(
            model, tokenizer, [4, 8, 15, 16, 23, 42], 12, eos_token_ids=[], compile=compile)])
        assert ("qkv_proj" in model.layers[0].self_attn) == compile
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]]
    for (_, a), (_, b) in zip(*runs):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


def test_switch_and_unsupported_models(make_checkpoint, monkeypatch):
    model, _ = load_model(make_checkpoint("llama"))
    monkeypatch.setenv("MARLIN_MLX_COMPILE", "0")
    assert decode_forward(model) is model
    assert "q_proj" in model.layers[0].self_attn  # not fused with compilation off
    monkeypatch.setenv("MARLIN_MLX_COMPILE", "1")
    assert isinstance(decode_forward(model), CompiledDecoder)
    glm = _random_moe("glm4_moe_lite", quantize=False)
    for layer in glm.layers:  # the expanded attention form has no compiled split
        layer.self_attn.form = "expanded"
    assert glm.compiled_decoder() is None and decode_forward(glm, True) is glm


def _random_moe(arch, quantize):
    """A tiny Qwen3-MoE or GLM-4.7-Flash-shaped model with random weights."""
    from mlx.utils import tree_flatten

    from marlin_mlx.models import glm4_moe_lite, qwen3_moe

    if arch == "qwen3_moe":
        model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_config(dict(
            vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0])))
    else:
        model = glm4_moe_lite.Model(glm4_moe_lite.ModelArgs.from_config(dict(
            vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
            topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32,
            qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.8, norm_topk_prob=True,
            max_position_embeddings=256, rope_theta=1e6, first_k_dense_replace=1)))
    mx.random.seed(5)
    model.update(tree_unflatten([(k, 0.1 * mx.random.normal(v.shape))
                                 for k, v in tree_flatten(model.parameters())]))
    if quantize:
        quantize_modules(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "4bit"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe_lite"])
def test_compiled_step_matches_plain_moe_models(arch, quantize):
    model = _random_moe(arch, quantize)
    prompt = mx.array([3, 17, 5, 9, 40, 2, 11], mx.int32)
    plain = _decode(model, model, prompt)
    dec = decode_forward(model, True)
    assert isinstance(dec, CompiledDecoder)
    if arch == "glm4_moe_lite":  # q_a and kv_a fused into one projection
        attn = model.layers[0].self_attn
        assert "qkv_a_proj" in attn and "q_a_proj" not in attn
    compiled = _decode(dec, model, prompt)
    for a, c in zip(plain, compiled):
        assert a.shape == c.shape
        assert mx.allclose(a, c, rtol=1e-5, atol=1e-5).item()
    assert dec.failed is None


@pytest.mark.parametrize("whole", [True, False], ids=["whole-step", "per-layer"])
def test_glm_whole_step_over_paged_latent_cache(whole, monkeypatch):
    # MLACache on its paged path (the GPU default; on the CPU the op's MLX reference) lets the
    # whole step compile as one function: the cache write is a slice update at an array
    # position. Small cache steps make the buffer grow (and the step retrace) during decode.
    from marlin_mlx.models import base
    from marlin_mlx.models.mla_cache import MLACache
    monkeypatch.setattr(MLACache, "decode_attention", "paged")
    monkeypatch.setattr(base, "WHOLE_STEP", whole)
    model = _random_moe("glm4_moe_lite", quantize=True)
    prompt = mx.array([3, 17, 5, 9, 40, 2, 11], mx.int32)

    def run(forward):
        cache = model.make_cache()
        for c in cache:
            c.step = 4
        return _decode(forward, model, prompt, steps=12, cache=cache), cache

    (plain, pc), dec = run(model), decode_forward(model, True)
    compiled, cc = run(dec)
    assert dec.failed is None and bool(dec._wholes) == whole
    for a, c in zip(plain, compiled):
        assert mx.allclose(a, c, rtol=1e-5, atol=1e-5).item()
    for a, c in zip(pc, cc):
        assert c.offset == a.offset == len(prompt) + 12 and c.buffer.shape == a.buffer.shape
        assert mx.array_equal(c.state[0], a.state[0]).item()


def test_latent_cache_rows_in_place_only_on_an_exclusive_buffer():
    # After a trim, a `state` taken before may share rows that later steps rewrite: the whole
    # step then traces with slice updates (which copy) until the buffer is reallocated.
    from marlin_mlx.models.mla_cache import MLACache
    c = MLACache(step=4)
    c.append(mx.zeros((1, 1, 3, 8)), 6)
    assert c.rows_in_place and c.trace_key()[-1] is True
    c.trim(0)
    assert c.rows_in_place
    c.trim(1)
    assert not c.rows_in_place and c.trace_key()[-1] is False
    c.trace_inputs()  # offset 2 -> 3 fits: same buffer
    assert not c.rows_in_place
    c.append(mx.zeros((1, 1, 3, 8)), 6)  # grows: a new buffer
    assert c.rows_in_place and c.buffer.shape[2] >= 5


def test_whole_step_failure_writes_nothing(monkeypatch):
    from marlin_mlx.models.mla_cache import MLACache
    monkeypatch.setattr(MLACache, "decode_attention", "paged")
    model = _random_moe("glm4_moe_lite", quantize=False)
    prompt = mx.array([3, 1, 4, 1, 5], mx.int32)
    plain = _decode(model, model, prompt, steps=3)
    dec = CompiledDecoder(model)
    dec._whole_fn = lambda *a: (_ for _ in ()).throw(RuntimeError("cannot compile this"))
    with pytest.warns(UserWarning, match="compiled decode step disabled"):
        out = _decode(dec, model, prompt, steps=3)
    assert "cannot compile" in dec.failed
    for a, b in zip(plain, out):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


def test_fuse_linears_refuses_mixed_layers():
    a = QuantizedLinear(64, 32, group_size=32, bits=4)
    b = QuantizedLinear(64, 16, group_size=64, bits=4)
    c = QuantizedLinear(64, 16, group_size=32, bits=8)
    assert fuse_linears([a, b]) is None and fuse_linears([a, c]) is None
    fused = fuse_linears([a, QuantizedLinear(64, 16, group_size=32, bits=4)])
    assert fused["weight"].shape[0] == 48 and fused.bits == 4 and fused.group_size == 32
    import mlx.nn as nn
    assert fuse_linears([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)]) is None
    assert fuse_linears([a, nn.Linear(64, 4)]) is None


def test_failed_trace_falls_back_to_the_plain_model(make_checkpoint):
    model, _ = load_model(make_checkpoint("qwen3"))
    prompt = mx.array([3, 1, 4, 1, 5], mx.int32)
    plain = _decode(model, model, prompt, steps=3)
    dec = CompiledDecoder(model)

    def broken(*args):
        raise RuntimeError("cannot compile this")

    dec._between[-1] = broken  # fails after all but the last layer wrote their cache
    with pytest.warns(UserWarning, match="compiled decode step disabled"):
        out = _decode(dec, model, prompt, steps=3)
    assert dec.failed and "cannot compile" in dec.failed
    for a, b in zip(plain, out):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


def test_prefill_pipelining_changes_nothing(make_checkpoint, monkeypatch):
    # DecoderStack hands every PIPELINE_LAYERS layers of a long prompt to the GPU while it
    # builds the rest (mx.async_eval): same logits and cache, bit for bit, as one graph
    from marlin_mlx.models import base
    path = make_checkpoint("qwen3")
    model = _fresh(path, True)
    prompt = mx.random.randint(0, 100, (1, base.PIPELINE_MIN_TOKENS + 9)).astype(mx.uint32)
    out = {}
    for every in (0, 1):
        monkeypatch.setattr(base, "PIPELINE_LAYERS", every)
        cache = model.make_cache()
        logits = model(prompt, cache=cache)
        mx.eval(logits, [c.state for c in cache])
        out[every] = (logits, [c.state for c in cache])
    assert mx.array_equal(out[0][0], out[1][0])
    for a, b in zip(out[0][1], out[1][1]):
        assert all(mx.array_equal(x, y) for x, y in zip(a, b))


def test_prefill_pipelining_stays_out_of_transformations(make_checkpoint, monkeypatch):
    # without a cache (calibration's gradients, training) the model may run inside mx.grad,
    # where MLX refuses async_eval: a long cacheless forward must differentiate as before
    from marlin_mlx.models import base
    monkeypatch.setattr(base, "PIPELINE_LAYERS", 1)
    model, _ = load_model(make_checkpoint("qwen3"))
    tokens = mx.random.randint(0, 100, (1, base.PIPELINE_MIN_TOKENS + 5)).astype(mx.uint32)
    import mlx.nn as nn
    loss, grads = nn.value_and_grad(model, lambda m: m(tokens).astype(mx.float32).sum())(model)
    mx.eval(loss, grads)
    assert bool(mx.isfinite(loss))
