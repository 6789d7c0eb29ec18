"""Logit parity of our Llama / Qwen3 against transformers (PyTorch, CPU, float32).

Each case builds a tiny random checkpoint with transformers, loads it through marlin_mlx.loader and
compares logits: prefill, batched prefill, and decoding with the KV cache (single tokens and a
multi-token chunk after cached tokens) against the full forward.
"""

import mlx.core as mx
import numpy as np
import pytest

from marlin_mlx.loader import load
from marlin_mlx.models import SUPPORTED_MODEL_TYPES, get_model_class
from marlin_mlx.models.base import rope_parameters
from marlin_mlx.models.cache import KVCache
from parity import rel_err

TOL = 1e-4
PROMPTS = [
    "The small boat left the harbour early, and the two fishermen talked about the weather.",
    "A cup of tea, a good book and a rainy afternoon: 42 pages read before the train arrived!",
]

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
YARN = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
        "original_max_position_embeddings": 64}
YARN_EXPLICIT = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 8.0, "beta_fast": 16.0,
                 "beta_slow": 2.0, "attention_factor": 1.25, "original_max_position_embeddings": 32}

# id -> (arch, make_checkpoint kwargs)
CASES = {
    "llama-untied-gqa": ("llama", {}),
    "llama-tied-mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama-mqa-headdim": ("llama", {"num_key_value_heads": 1, "head_dim": 24}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-llama3": ("llama", {"rope_parameters": LLAMA3}),
    "llama-llama3-old": ("llama", {"rope_parameters": LLAMA3, "old_spelling": True}),
    "llama-linear": ("llama", {"rope_parameters": LINEAR}),
    "llama-linear-old": ("llama", {"rope_parameters": LINEAR, "old_spelling": True}),
    "llama-yarn": ("llama", {"rope_parameters": YARN}),
    "llama-yarn-mscale": ("llama", {"rope_parameters": dict(YARN, mscale=1.0, mscale_all_dim=0.5,
                                                            truncate=False)}),
    "llama-theta-old": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 300.0},
                                  "old_spelling": True}),
    "qwen3-tied-gqa": ("qwen3", {}),
    "qwen3-untied": ("qwen3", {"tie_word_embeddings": False, "num_key_value_heads": 4}),
    "qwen3-bias": ("qwen3", {"attention_bias": True}),
    "qwen3-yarn": ("qwen3", {"rope_parameters": YARN}),
    "qwen3-yarn-explicit-old": ("qwen3", {"rope_parameters": YARN_EXPLICIT, "old_spelling": True}),
    "qwen3-llama3": ("qwen3", {"rope_parameters": LLAMA3}),
    "qwen3-sliding": ("qwen3", {"use_sliding_window": True, "sliding_window": 6,
                                "max_window_layers": 1}),
}


def hf_logits(path, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def encode_batch(tokenizer, prompts) -> np.ndarray:
    rows = [tokenizer.encode(p) for p in prompts]
    n = min(len(r) for r in rows)
    return np.array([r[:n] for r in rows], dtype=np.int32)


@pytest.fixture(scope="module")
def case(request, make_checkpoint):
    arch, kw = CASES[request.param]
    path = make_checkpoint(arch, **kw)
    model, tokenizer = load(path)
    ids = encode_batch(tokenizer, PROMPTS)
    return path, model, ids, hf_logits(path, ids)


@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_prefill_parity(case):
    path, model, ids, ref = case
    assert ids.shape[1] >= 16
    out = model(mx.array(ids))
    assert out.dtype == mx.float32
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_decode_with_cache_matches_full_forward(case):
    path, model, ids, ref = case
    ids = ids[:1]
    full = np.array(model(mx.array(ids)))
    # a small step makes the cache grow several times during the test
    cache = [KVCache(step=4) for _ in model.layers]
    pieces = [model(mx.array(ids[:, :5]), cache=cache),   # prefill
              model(mx.array(ids[:, 5:9]), cache=cache)]  # a chunk after cached tokens
    for i in range(9, ids.shape[1]):
        pieces.append(model(mx.array(ids[:, i:i + 1]), cache=cache))
    stepped = np.concatenate([np.array(p) for p in pieces], axis=1)
    assert cache[0].offset == ids.shape[1]
    assert rel_err(stepped, full) < TOL
    assert rel_err(stepped, ref[:1]) < TOL


def test_make_cache_and_contract(tiny_llama_path):
    model, _ = load(tiny_llama_path)
    caches = model.make_cache()
    assert len(caches) == len(model.layers) == model.args.num_hidden_layers
    assert all(isinstance(c, KVCache) for c in caches)
    assert model.args.model_type == "llama" and model.args.vocab_size == 512
    logits = model(mx.array([[1, 2, 3]]), cache=caches)
    assert logits.shape == (1, 3, 512) and caches[0].offset == 3


@pytest.mark.parametrize("scaled", ["llama-llama3", "llama-yarn", "llama-linear"])
def test_rope_scaling_changes_logits(make_checkpoint, scaled):
    """Guard against a parity test that cannot fail: the scaled rope must matter at these sizes."""
    arch, kw = CASES[scaled]
    plain = dict(kw, rope_parameters={"rope_type": "default",
                                      "rope_theta": kw["rope_parameters"]["rope_theta"]})
    a, _ = load(make_checkpoint(arch, **kw))
    b, _ = load(make_checkpoint(arch, **plain))
    ids = mx.array([list(range(3, 40))])
    assert rel_err(a(ids), b(ids)) > 100 * TOL


def test_both_spellings_read_alike():
    new = {"rope_parameters": dict(LLAMA3), "max_position_embeddings": 256}
    old = {"rope_theta": 500.0, "max_position_embeddings": 256,
           "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_theta"}}
    assert rope_parameters(new) == rope_parameters(old)
    legacy = {"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rope_parameters(legacy) == {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0,
                                       "type": "linear"}
    assert rope_parameters({})["rope_theta"] == 10000.0
    # yarn without original_max_position_embeddings falls back to max_position_embeddings
    assert rope_parameters({"max_position_embeddings": 99, "rope_scaling": {
        "rope_type": "yarn", "factor": 2.0}})["original_max_position_embeddings"] == 99


def test_unsupported_rope_type_is_refused():
    _, args_class = get_model_class("llama")
    args = args_class.from_config({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 8,
        "num_attention_heads": 4, "vocab_size": 10,
        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    model_class, _ = get_model_class("llama")
    with pytest.raises(ValueError, match="dynamic"):
        model_class(args)


def test_registry():
    assert {"llama", "qwen3"} <= set(SUPPORTED_MODEL_TYPES)
    assert not {"base", "cache", "moe", "mla_cache"} & set(SUPPORTED_MODEL_TYPES)
    for model_type in SUPPORTED_MODEL_TYPES:
        model_class, args_class = get_model_class(model_type)
        assert hasattr(args_class, "from_config") and hasattr(model_class, "sanitize")
    with pytest.raises(ValueError, match="gpt2.*llama"):
        get_model_class("gpt2")
