"""Tiny models with random weights for the serving tests (no transformers round trip needed:
these tests compare the paged engine with the same model's own contiguous-cache path)."""

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from marlin_mlx.models import get_model_class

VOCAB = 512  # >= the conftest tokenizer's 400

CONFIGS = {
    "llama": dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5,
    ),
    # layer 1 is a sliding-window layer (window 8): paged decode must mask the same way
    "qwen3": dict(
        model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=256, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=8, max_window_layers=1,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0], max_position_embeddings=256,
    ),
    "glm4_moe_lite": dict(
        model_type="glm4_moe_lite", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=8, v_head_dim=16,
        routed_scaling_factor=1.8, norm_topk_prob=True, max_position_embeddings=256,
        first_k_dense_replace=1,
    ),
}
ARCHS = tuple(CONFIGS)


def random_model(arch: str, seed: int = 0):
    """A float32 model of `arch` with every parameter drawn at random (norms around 1)."""
    Model, Args = get_model_class(CONFIGS[arch]["model_type"])
    model = Model(Args.from_config(CONFIGS[arch]))
    params = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        k = mx.random.key(seed * 100003 + i)
        if "norm" in name:
            v = mx.random.uniform(0.5, 1.5, p.shape, key=k)
        elif name.endswith("e_score_correction_bias"):
            v = 0.1 * mx.random.normal(p.shape, key=k)
        else:
            v = mx.random.normal(p.shape, key=k) * p.shape[-1] ** -0.5
        params.append((name, v.astype(mx.float32)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    model.eval()
    return model
