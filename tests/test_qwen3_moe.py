"""Qwen3-MoE (`qwen3_moe`) against transformers (PyTorch, CPU, float32), and the MoE layer.

Tiny random checkpoints are built with transformers' Qwen3MoeForCausalLM (8 experts top-2, a
dense layer from `mlp_only_layers`), saved in HF format (per-expert tensors) and loaded through
marlin_mlx.loader.
"""

import gc
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from marlin_mlx.errors import MarlinError
from marlin_mlx.loader import load_model
from marlin_mlx.models import moe
from marlin_mlx.models import qwen3_moe as q3m
from marlin_mlx.models.cache import KVCache
from parity import cosine, hf_logits, rel_err

TOL = 1e-4
CONFIG = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
    decoder_sparse_step=1, max_position_embeddings=256, initializer_range=0.1,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    bos_token_id=0, eos_token_id=1, pad_token_id=None,
)


def build(out_dir, seed=0, **overrides):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**CONFIG, **overrides})).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # HF starts norms at one: a missing norm would not show
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3moe")
    hf = build(path)
    model, _ = load_model(path)
    return path, hf, model


def ids_of(shape, seed=1):
    return np.random.RandomState(seed).randint(0, CONFIG["vocab_size"], shape).astype(np.int32)


def test_prefill_parity(ckpt):
    _, hf, model = ckpt
    assert isinstance(model, q3m.Model)
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["SparseMoE", "MLP", "SparseMoE"]
    short = ids_of((2, 9))  # 36 (token, expert) pairs: unsorted gather
    long = ids_of((2, 40))  # 160 pairs: sorted by expert first
    assert short.size * 2 < moe.SORT_MIN_PAIRS <= long.size * 2
    for ids in (short, long):
        assert rel_err(model(mx.array(ids)), hf_logits(hf, ids)) < TOL


def test_decode_with_cache_equals_full_forward(ckpt):
    _, hf, model = ckpt
    ids = ids_of((2, 12), seed=2)
    full = np.array(model(mx.array(ids)))
    assert rel_err(full, hf_logits(hf, ids)) < TOL
    cache = model.make_cache()
    assert all(isinstance(c, KVCache) for c in cache)
    steps = [model(mx.array(ids[:, :5]), cache=cache)]
    steps += [model(mx.array(ids[:, t : t + 1]), cache=cache) for t in range(5, 9)]
    steps.append(model(mx.array(ids[:, 9:]), cache=cache))
    assert rel_err(np.concatenate([np.array(s) for s in steps], axis=1), full) < TOL


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


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_routing_matches_transformers(norm_topk_prob):
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    router = Qwen3MoeTopKRouter(Qwen3MoeConfig(**{**CONFIG, "norm_topk_prob": norm_topk_prob}))
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
    x = np.random.RandomState(4).standard_normal((256, CONFIG["hidden_size"])).astype(np.float32)
    with torch.no_grad():
        logits, w_ref, i_ref = router(torch.tensor(x))
    inds, w = moe.route(mx.array(logits.numpy()), 2, scoring="softmax", norm_topk_prob=norm_topk_prob)
    o_ref, o = np.argsort(i_ref.numpy(), -1), np.argsort(np.array(inds), -1)
    assert (np.take_along_axis(np.array(inds), o, -1) ==
            np.take_along_axis(i_ref.numpy(), o_ref, -1)).all()
    w, w_ref = np.take_along_axis(np.array(w), o, -1), np.take_along_axis(w_ref.numpy(), o_ref, -1)
    assert np.abs(w - w_ref).max() < 1e-6
    assert np.allclose(w.sum(-1), 1.0, atol=1e-6) == norm_topk_prob


def test_route_rejects_bad_arguments():
    logits = mx.zeros((3, 8))
    with pytest.raises(ValueError, match="scoring"):
        moe.route(logits, 2, scoring="relu")
    with pytest.raises(ValueError, match="top_k"):
        moe.route(logits, 9)
    with pytest.raises(ValueError, match="n_group"):
        moe.route(logits, 2, n_group=3)


def test_sorted_and_unsorted_expert_paths_agree():
    mx.random.seed(0)
    glu = moe.SwitchGLU(32, 16, 6)
    for proj in (glu.gate_proj, glu.up_proj, glu.down_proj):
        proj.weight = mx.random.normal(proj.weight.shape) * 0.2
    x = mx.random.normal((5, 7, 32))
    inds, w = moe.route(mx.random.normal((5, 7, 6)), 3)
    fast = glu(x, inds, w)  # 105 pairs: sorted
    rows = [glu(x[i : i + 1, j : j + 1], inds[i : i + 1, j : j + 1], w[i : i + 1, j : j + 1])
            for i in range(5) for j in range(7)]  # 3 pairs each: unsorted
    assert rel_err(fast, mx.concatenate(rows, axis=0).reshape(5, 7, 32)) < 1e-5
    # the plain definition: sum_k w_k * down_e(silu(gate_e x) * up_e x)
    xe, ie, we = np.array(x).reshape(-1, 32), np.array(inds).reshape(-1, 3), np.array(w).reshape(-1, 3)
    g, u, d = (np.array(p.weight) for p in (glu.gate_proj, glu.up_proj, glu.down_proj))
    ref = np.zeros_like(xe)
    for t in range(xe.shape[0]):
        for k in range(3):
            e = ie[t, k]
            a = xe[t] @ g[e].T
            ref[t] += we[t, k] * ((a / (1 + np.exp(-a)) * (xe[t] @ u[e].T)) @ d[e].T)
    assert rel_err(fast, ref.reshape(5, 7, 32)) < 1e-5


def _hub_spelling(cfg: dict) -> dict:
    cfg = dict(cfg)
    cfg["num_experts"] = cfg.pop("num_local_experts")
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = None
    return cfg


def test_both_config_spellings(ckpt, tmp_path):
    path, hf, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    assert "num_local_experts" in cfg and "rope_parameters" in cfg  # transformers 5 writes these
    old = _hub_spelling(cfg)
    assert q3m.ModelArgs.from_config(old) == q3m.ModelArgs.from_config(cfg)
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(old))
    model, _ = load_model(tmp_path)
    ids = ids_of((1, 9), seed=7)
    assert rel_err(model(mx.array(ids)), hf_logits(hf, ids)) < TOL


@pytest.mark.parametrize("step,dense", [(2, []), (1, [0, 3]), (3, [2])])
def test_sparse_layer_pattern_matches_transformers(step, dense):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = {**CONFIG, "num_hidden_layers": 5, "decoder_sparse_step": step, "mlp_only_layers": dense}
    hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg))
    expected = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert q3m.ModelArgs.from_config({**cfg, "model_type": "qwen3_moe"}).sparse_layers == expected


def test_fused_expert_layout_loads(ckpt, tmp_path):
    path, hf, _ = ckpt
    shutil.copy(path / "config.json", tmp_path / "config.json")
    w = mx.load(str(path / "model.safetensors"))
    for i in (0, 2):
        p = f"model.layers.{i}.mlp.experts"
        gate = mx.stack([w.pop(f"{p}.{e}.gate_proj.weight") for e in range(8)])
        up = mx.stack([w.pop(f"{p}.{e}.up_proj.weight") for e in range(8)])
        w[f"{p}.gate_up_proj"] = mx.concatenate([gate, up], axis=1)
        w[f"{p}.down_proj"] = mx.stack([w.pop(f"{p}.{e}.down_proj.weight") for e in range(8)])
    mx.save_safetensors(str(tmp_path / "model.safetensors"), w)
    model, _ = load_model(tmp_path)
    ids = ids_of((1, 9), seed=8)
    assert rel_err(model(mx.array(ids)), hf_logits(hf, ids)) < TOL


def test_missing_expert_is_a_clear_error(ckpt, tmp_path):
    path, _, _ = ckpt
    shutil.copy(path / "config.json", tmp_path / "config.json")
    w = mx.load(str(path / "model.safetensors"))
    del w["model.layers.2.mlp.experts.5.up_proj.weight"]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), w)
    with pytest.raises(MarlinError, match="experts.5.up_proj"):
        load_model(tmp_path)


def test_mlx_lm_quantized_checkpoint_loads(ckpt, tmp_path):
    """mlx-lm's conversion (stacked switch_mlp, 4-bit experts, 8-bit router) loads unchanged."""
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx_lm.utils import quantize_model, save_config, save_model

    path, _, float_model = ckpt
    hub = tmp_path / "hub"
    hub.mkdir()
    shutil.copy(path / "model.safetensors", hub / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps(_hub_spelling(cfg)))
    theirs, config = mlx_lm_load_model(hub)
    theirs, config = quantize_model(theirs, config, group_size=32, bits=4)
    save_model(tmp_path / "q", theirs)
    save_config(config, tmp_path / "q" / "config.json")
    ours, _ = load_model(tmp_path / "q")
    mlp = ours.layers[0].mlp
    assert isinstance(mlp.switch_mlp.down_proj, moe.QuantizedSwitchLinear)
    assert mlp.gate.bits == 8  # mlx-lm's predicate keeps the router at 8 bits
    ids = mx.array(ids_of((2, 40), seed=9))
    a = np.array(ours(ids))
    assert rel_err(a, theirs(ids)) < TOL
    assert rel_err(ours(ids[:, :1]), a[:, :1]) < TOL  # decode (unsorted gather_qmm) path
    assert cosine(a, float_model(ids)) > 0.8  # every layer in 4 bits, random weights


def test_expert_stacking_streams(tmp_path):
    """Loading per-expert tensors into stacks holds about one copy of the weights, not two."""
    from mlx.utils import tree_flatten

    cfg = {**CONFIG, "model_type": "qwen3_moe", "hidden_size": 256, "moe_intermediate_size": 256,
           "num_experts": 32, "num_hidden_layers": 2, "mlp_only_layers": []}
    model = q3m.Model(q3m.ModelArgs.from_config(cfg))
    weights = {}
    for k, v in tree_flatten(model.parameters()):
        if ".switch_mlp." in k:  # written as the hub does: one tensor per expert
            prefix, proj = k.split(".switch_mlp.")
            for e in range(cfg["num_experts"]):
                weights[f"{prefix}.experts.{e}.{proj}"] = mx.random.normal(v.shape[1:])
        else:
            weights[k] = mx.random.normal(v.shape)
    total = sum(v.nbytes for v in weights.values())
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    del weights, model
    gc.collect()  # nothing else may be freed while the load is measured
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    loaded, _ = load_model(tmp_path)
    assert mx.get_active_memory() - base == pytest.approx(total, rel=0.01)
    # one projection's stack (1/6 of the weights here) may exist twice while it is copied
    assert mx.get_peak_memory() - base < 1.4 * total
