"""GLM-4.7-Flash (`glm4_moe_lite`: MLA + MoE) against transformers (PyTorch, CPU, float32).

Tiny random checkpoints are built with transformers' Glm4MoeLiteForCausalLM (first layer
dense, 8 experts top-2 in 2 groups of which 1 may be chosen, one shared expert, a non-zero
`e_score_correction_bias`), saved in HF format and loaded through marlin_mlx.loader.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten

from marlin_mlx.loader import load_model
from marlin_mlx.models import glm4_moe_lite as glm
from marlin_mlx.models import moe
from marlin_mlx.models.mla_cache import MLACache
from parity import cosine, hf_logits, rel_err

TOL = 1e-4
CONFIG = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32,
    kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=8, v_head_dim=16,
    routed_scaling_factor=1.8, norm_topk_prob=True, max_position_embeddings=256,
    initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    bos_token_id=0, eos_token_id=1, pad_token_id=None,
)
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "mscale": 1.0,
        "mscale_all_dim": 0.8, "original_max_position_embeddings": 32}


def build(out_dir, seed=0, **overrides):
    import torch
    from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    torch.manual_seed(seed)
    model = Glm4MoeLiteForCausalLM(Glm4MoeLiteConfig(**{**CONFIG, **overrides})).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # HF starts norms at one: a missing norm would not show
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                # selection bias on the scale of the score gaps, so that it changes choices
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm")
    hf = build(path)
    model, _ = load_model(path)
    return path, hf, model


def ids_of(shape, seed=1):
    return np.random.RandomState(seed).randint(0, CONFIG["vocab_size"], shape).astype(np.int32)


def set_form(model, form):
    for layer in model.layers:
        layer.self_attn.form = form


def test_prefill_parity(ckpt):
    _, hf, model = ckpt
    assert isinstance(model, glm.Model)
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["MLP", "SparseMoE", "SparseMoE"]
    ids = ids_of((2, 40))  # 2*40*2 pairs: the experts' inputs take the sorted (prefill) path
    assert ids.size * CONFIG["num_experts_per_tok"] >= moe.SORT_MIN_PAIRS
    assert rel_err(model(mx.array(ids)), hf_logits(hf, ids)) < TOL


@pytest.fixture
def forms(monkeypatch):
    """Records which attention form each layer call takes."""
    seen = []
    for name in ("_absorbed", "_expanded"):
        orig = getattr(glm.Attention, name)

        def spy(self, *a, _orig=orig, _name=name):
            seen.append(_name[1:])
            return _orig(self, *a)

        monkeypatch.setattr(glm.Attention, name, spy)
    return seen


def test_decode_with_cache_equals_full_forward(ckpt, forms):
    _, hf, model = ckpt
    ids = ids_of((2, 12), seed=2)
    full = np.array(model(mx.array(ids)))
    assert rel_err(full, hf_logits(hf, ids)) < TOL
    cache = model.make_cache()
    assert all(isinstance(c, MLACache) for c in cache)
    steps = [model(mx.array(ids[:, :5]), cache=cache)]  # prefill, expanded
    steps += [model(mx.array(ids[:, t : t + 1]), cache=cache) for t in range(5, 9)]  # absorbed
    steps.append(model(mx.array(ids[:, 9:]), cache=cache))  # a chunk after cached tokens
    assert rel_err(np.concatenate([np.array(s) for s in steps], axis=1), full) < TOL
    assert cache[0].offset == 12
    n = len(model.layers)
    assert forms == ["expanded"] * 2 * n + ["absorbed"] * 4 * n + ["expanded"] * n


@pytest.mark.parametrize("how", ["paged", "matmul"])
def test_decode_attention_over_the_buffer_equals_sdpa(ckpt, monkeypatch, how):
    """MLACache's decode attention over its buffer in place: through kernels/paged_attention.py
    (blocks of `step` tokens; on the CPU the op runs its reference) or two matmuls; two
    sequences, decode steps across several blocks, a trim, and a regrowth."""
    _, _, model = ckpt
    ids = ids_of((2, 14), seed=4)
    calls = []
    orig = MLACache.attend

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(MLACache, "attend", spy)
    results = []
    for mode in ("sdpa", how):
        monkeypatch.setattr(MLACache, "decode_attention", mode)
        cache = [MLACache(step=4) for _ in model.layers]
        out = [model(mx.array(ids[:, :3]), cache=cache)]
        out += [model(mx.array(ids[:, t : t + 1]), cache=cache) for t in range(3, 10)]
        for c in cache:
            c.trim(2)  # decode again over the trimmed tail
        out += [model(mx.array(ids[:, t : t + 1]), cache=cache) for t in range(8, 14)]
        results.append(np.concatenate([np.array(o) for o in out], axis=1))
    n = len(model.layers)
    assert calls.count(True) == 13 * n  # every decode step of the second pass, no prefill
    assert rel_err(results[1], results[0]) < TOL


def test_absorbed_equals_expanded(ckpt, forms):
    _, _, model = ckpt
    ids = ids_of((1, 10), seed=3)
    try:
        set_form(model, "expanded")
        expanded_full = np.array(model(mx.array(ids)))
        cache = model.make_cache()
        model(mx.array(ids[:, :9]), cache=cache)
        expanded_step = np.array(model(mx.array(ids[:, 9:]), cache=cache))
        set_form(model, "absorbed")
        absorbed_full = np.array(model(mx.array(ids)))  # absorbed over a causal prefill too
        cache = model.make_cache()
        model(mx.array(ids[:, :9]), cache=cache)
        absorbed_step = np.array(model(mx.array(ids[:, 9:]), cache=cache))
    finally:
        set_form(model, None)
    n = len(model.layers)
    assert forms == ["expanded"] * 3 * n + ["absorbed"] * 3 * n
    assert rel_err(absorbed_full, expanded_full) < TOL
    assert rel_err(absorbed_step, expanded_step) < TOL
    assert rel_err(absorbed_step, expanded_full[:, -1:]) < TOL


def test_latent_cache_holds_only_latent_and_rope_key(ckpt):
    _, _, model = ckpt
    a = model.args
    cache = model.make_cache()
    B, T = 2, 7
    model(mx.array(ids_of((B, T))), cache=cache)
    for c in cache:
        latent, rope_k = c.state
        assert latent.shape == (B, 1, T, a.kv_lora_rank)
        assert rope_k.shape == (B, 1, T, a.qk_rope_head_dim)
        # one step of capacity, float32: exactly (kv_lora_rank + rope) values per token
        assert c.nbytes == B * c.step * (a.kv_lora_rank + a.qk_rope_head_dim) * 4
    assert cache[0].trim(3) == 3 and cache[0].state[0].shape[2] == T - 3


def test_cache_grows_past_one_step():
    c = MLACache(step=4)
    for t in range(6):
        out = c.update_and_fetch(mx.full((1, 1, 1, 3), float(t)), mx.full((1, 1, 1, 2), -float(t)))
    assert out.shape == (1, 1, 6, 5) and c.nbytes == 8 * 5 * 4
    assert np.array(out)[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert np.array(out)[0, 0, :, 4].tolist() == [0, -1, -2, -3, -4, -5]
    with pytest.raises(ValueError, match="disagree"):
        c.update_and_fetch(mx.zeros((1, 1, 2, 3)), mx.zeros((1, 1, 1, 2)))


def test_routing_matches_transformers(ckpt):
    import torch

    _, hf, model = ckpt
    x = np.random.RandomState(4).standard_normal((256, CONFIG["hidden_size"])).astype(np.float32)
    hf_gate = hf.model.layers[1].mlp.gate
    with torch.no_grad():
        _, w_ref, i_ref = hf_gate(torch.tensor(x))
    inds, w = model.layers[1].mlp.route(mx.array(x))
    order_ref, order = np.argsort(i_ref.numpy(), -1), np.argsort(np.array(inds), -1)
    i_ref = np.take_along_axis(i_ref.numpy(), order_ref, -1)
    assert (np.take_along_axis(np.array(inds), order, -1) == i_ref).all()
    w_ours = np.take_along_axis(np.array(w), order, -1)
    assert np.abs(w_ours - np.take_along_axis(w_ref.numpy(), order_ref, -1)).max() < 1e-5
    # the test exercises what it should: all chosen experts lie in one group per token, and the
    # selection bias changes some choices (it selects, it does not weigh)
    assert (np.ptp(i_ref // 4, axis=-1) == 0).all()
    gate = model.layers[1].mlp.gate
    unbiased, _ = moe.route(gate(mx.array(x)), 2, scoring="sigmoid", n_group=2, topk_group=1)
    assert (np.sort(np.array(unbiased), -1) != i_ref).any()
    assert np.allclose(w_ours.sum(-1), CONFIG["routed_scaling_factor"], atol=1e-5)


def test_greedy_32_tokens_match_transformers(ckpt):
    import torch

    _, hf, model = ckpt
    prompt = ids_of((1, 6), seed=5)
    hf.generation_config.eos_token_id = None  # run all 32 steps
    with torch.no_grad():
        ids = torch.tensor(prompt, dtype=torch.long)
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=32)
    cache = model.make_cache()
    logits = model(mx.array(prompt), cache=cache)
    out = []
    for _ in range(32):
        tok = mx.argmax(logits[:, -1], axis=-1)
        out.append(int(tok.item()))
        logits = model(tok.reshape(1, 1), cache=cache)
    assert out == ref[0, 6:].tolist()


def test_yarn_mscale_parity(tmp_path):
    hf = build(tmp_path, seed=1, rope_parameters=YARN)
    model, _ = load_model(tmp_path)
    mscale = 0.1 * YARN["mscale_all_dim"] * np.log(YARN["factor"]) + 1.0
    assert model.layers[0].self_attn.scale == pytest.approx((32 + 8) ** -0.5 * mscale**2)
    ids = ids_of((1, 48), seed=6)  # past original_max_position_embeddings
    assert rel_err(model(mx.array(ids)), hf_logits(hf, ids)) < TOL


def test_other_variants_parity(tmp_path):
    """No q low-rank (q_proj), half-split RoPE, ungrouped unnormalized routing, 2 dense layers."""
    hf = build(tmp_path, seed=2, q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
               norm_topk_prob=False, routed_scaling_factor=1.0, num_hidden_layers=4,
               mlp_layer_types=["dense", "sparse", "dense", "sparse"])
    model, _ = load_model(tmp_path)
    assert "q_proj" in model.layers[0].self_attn and not model.args.rope_interleave
    ids = ids_of((2, 11), seed=11)
    full = np.array(model(mx.array(ids)))
    assert rel_err(full, hf_logits(hf, ids)) < TOL
    cache = model.make_cache()
    model(mx.array(ids[:, :10]), cache=cache)
    assert rel_err(model(mx.array(ids[:, 10:]), cache=cache), full[:, 10:]) < TOL


def _hub_spelling(cfg: dict) -> dict:
    """transformers 5's config.json -> the hub's older spelling (as mlx-lm reads it)."""
    cfg = dict(cfg)
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = None
    types = cfg.pop("mlp_layer_types")
    cfg["first_k_dense_replace"] = types.index("sparse")
    cfg["moe_layer_freq"] = 1
    cfg.update(topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=1)
    return cfg


def test_hub_spelling_and_mtp_layer(ckpt, tmp_path):
    path, hf, model = ckpt
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((path / "config.json").read_text())
    old = _hub_spelling(cfg)
    assert glm.ModelArgs.from_config(old) == glm.ModelArgs.from_config(cfg)
    (tmp_path / "config.json").write_text(json.dumps(old))
    # the hub checkpoint carries one MTP layer after the last decoder layer: it is dropped
    weights = mx.load(str(tmp_path / "model.safetensors"))
    weights["model.layers.3.eh_proj.weight"] = mx.zeros((64, 128))
    weights["model.layers.3.mlp.experts.0.up_proj.weight"] = mx.zeros((32, 64))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    old_model, _ = load_model(tmp_path)
    ids = ids_of((1, 9), seed=7)
    assert rel_err(old_model(mx.array(ids)), hf_logits(hf, ids)) < TOL


def test_fused_expert_layout_loads(ckpt, tmp_path):
    """transformers 5's in-memory layout (experts.gate_up_proj / experts.down_proj, stacked)."""
    path, hf, _ = ckpt
    shutil.copy(path / "config.json", tmp_path / "config.json")
    w = mx.load(str(path / "model.safetensors"))
    for i in (1, 2):
        p = f"model.layers.{i}.mlp.experts"
        gate = mx.stack([w.pop(f"{p}.{e}.gate_proj.weight") for e in range(8)])
        up = mx.stack([w.pop(f"{p}.{e}.up_proj.weight") for e in range(8)])
        w[f"{p}.gate_up_proj"] = mx.concatenate([gate, up], axis=1)
        w[f"{p}.down_proj"] = mx.stack([w.pop(f"{p}.{e}.down_proj.weight") for e in range(8)])
    mx.save_safetensors(str(tmp_path / "model.safetensors"), w)
    model, _ = load_model(tmp_path)
    ids = ids_of((1, 9), seed=8)
    assert rel_err(model(mx.array(ids)), hf_logits(hf, ids)) < TOL


def hub_copy(src, dst):
    """The checkpoint with its config.json in the hub's spelling (as mlx-lm reads it)."""
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(_hub_spelling(cfg)))
    return dst


def test_mlx_lm_quantized_checkpoint_loads(ckpt, tmp_path):
    """mlx-lm converts (stacked switch_mlp, 4-bit experts, split kv_b_proj); we load its output."""
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx_lm.utils import quantize_model, save_config, save_model

    path, _, float_model = ckpt
    theirs, config = mlx_lm_load_model(hub_copy(path, tmp_path / "hub"))
    theirs, config = quantize_model(theirs, config, group_size=32, bits=4)
    save_model(tmp_path / "q", theirs)
    save_config(config, tmp_path / "q" / "config.json")
    ours, _ = load_model(tmp_path / "q")
    sw = ours.layers[1].mlp.switch_mlp
    assert isinstance(sw.gate_proj, moe.QuantizedSwitchLinear) and sw.gate_proj.bits == 4
    attn = ours.layers[0].self_attn  # the per-head halves of kv_b_proj, quantized by mlx-lm
    assert isinstance(attn.embed_q, glm.QuantizedPerHeadLinear)
    assert isinstance(attn.unembed_out, glm.QuantizedPerHeadLinear)
    ids = mx.array(ids_of((2, 40), seed=9))
    a = np.array(ours(ids))
    # mlx-lm normalizes q_a/kv_a with the config's eps (1e-5) where HF uses 1e-6: a tiny gap
    assert rel_err(a, theirs(ids)) < 1e-3
    assert rel_err(ours(ids[:, :1]), a[:, :1]) < TOL  # decode (unsorted gather) path
    # every layer in 4 bits (random weights): still pointing the float model's way
    assert cosine(a, float_model(ids)) > 0.8


def test_quantized_experts_close_to_float_and_equal_to_dequantized(ckpt):
    path, _, float_model = ckpt
    q, _ = load_model(path)
    ref, _ = load_model(path)
    swaps = [(n, m.to_quantized(32, 4, "affine")) for n, m in q.named_modules()
             if isinstance(m, moe.SwitchLinear)]
    assert len(swaps) == 2 * 3
    q.update_modules(tree_unflatten(swaps))
    for lq, lr in zip(q.layers[1:], ref.layers[1:]):
        for name in ("gate_proj", "up_proj", "down_proj"):
            m = getattr(lq.mlp.switch_mlp, name)
            getattr(lr.mlp.switch_mlp, name).weight = mx.dequantize(
                m.weight, m.scales, m.biases, group_size=32, bits=4)
    ids = mx.array(ids_of((2, 40), seed=10))
    a, b = np.array(q(ids)), np.array(float_model(ids))
    # 4-bit experts: close to the float model, not equal
    assert 0 < np.abs(a - b).mean() / np.abs(b).mean() < 0.3 and cosine(a, b) > 0.95
    assert rel_err(a, ref(ids)) < TOL  # prefill: sorted gather_qmm
    assert rel_err(q(ids[:, :1]), ref(ids[:, :1])) < TOL  # decode: unsorted


def test_quantized_kv_b_proj_is_split_and_requantized():
    args = glm.ModelArgs.from_config({**CONFIG, "model_type": "glm4_moe_lite", "kv_lora_rank": 64,
                                      "qk_nope_head_dim": 32, "v_head_dim": 32})
    H, r = args.num_attention_heads, args.kv_lora_rank
    w = mx.random.normal((H * (32 + 32), r), key=mx.random.key(0))
    qw, s, b = mx.quantize(w, group_size=32, bits=4)
    deq = mx.dequantize(qw, s, b, group_size=32, bits=4).reshape(H, 64, r)
    weights = {"p.kv_b_proj.weight": qw, "p.kv_b_proj.scales": s, "p.kv_b_proj.biases": b}
    glm._split_kv_b(weights, "p", args)
    assert set(weights) == {f"p.{m}.{k}" for m in ("embed_q", "unembed_out")
                            for k in ("weight", "scales", "biases")}
    eq = mx.dequantize(weights["p.embed_q.weight"], weights["p.embed_q.scales"],
                       weights["p.embed_q.biases"], group_size=32, bits=4)
    uo = mx.dequantize(weights["p.unembed_out.weight"], weights["p.unembed_out.scales"],
                       weights["p.unembed_out.biases"], group_size=32, bits=4)
    assert eq.shape == (H, r, 32) and uo.shape == (H, 32, r)
    # requantizing along the other axis adds at most one more rounding step
    assert rel_err(eq, deq[:, :32].swapaxes(-1, -2)) < 0.1
    assert rel_err(uo, deq[:, 32:]) < 1e-6  # same axis, same groups: exact


def test_bad_configs_are_refused():
    base = {**CONFIG, "model_type": "glm4_moe_lite"}
    with pytest.raises(ValueError, match="scoring_func"):
        glm.ModelArgs.from_config({**base, "scoring_func": "softmax"})
    with pytest.raises(ValueError, match="mlp_layer_types"):
        glm.ModelArgs.from_config({**base, "mlp_layer_types": ["dense", "moe", "sparse"]})
    with pytest.raises(ValueError, match="n_group"):
        glm.Model(glm.ModelArgs.from_config({**base, "n_group": 3}))


def test_router_stays_float32_when_loading_in_bfloat16(ckpt):
    # a bf16 selection bias would change which experts are chosen; the loader keeps it as stored
    model, _ = load_model(ckpt[0], dtype="bfloat16")
    gate = model.layers[1].mlp.gate
    assert gate.weight.dtype == mx.float32 and gate.e_score_correction_bias.dtype == mx.float32
    assert model.layers[1].self_attn.o_proj.weight.dtype == mx.bfloat16
