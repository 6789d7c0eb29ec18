"""Qwen3-MoE (`qwen3_moe`, e.g. Qwen3-30B-A3B): Qwen3's attention with sparse MoE MLPs.

Attention is Qwen3's (per-head q/k RMSNorm before RoPE, GQA, explicit head_dim). A layer is
sparse unless listed in `mlp_only_layers` or skipped by `decoder_sparse_step` (layer i is
sparse when (i + 1) % step == 0), as in transformers. Routing: softmax over the experts,
top-k, optionally renormalized (`norm_topk_prob`); no shared expert. The expert count is
`num_experts` in hub configs and `num_local_experts` in transformers 5's.
"""

from dataclasses import dataclass, field
from typing import Any, Optional



from .attention import PreNormDecoderLayer
from .base import MLP, CausalLM, check_activation, drop_unused, rope_parameters
from .moe import SparseMoE, stack_experts
from .qwen3 import Attention


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    moe_intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    num_experts: int
    num_experts_per_tok: int
    head_dim: int
    norm_topk_prob: bool = False
    sparse_layers: list = field(default_factory=list)  # per layer: True for MoE
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: Optional[int] = None
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 1e4})

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        check_activation(config)
        heads = config["num_attention_heads"]
        n_layers = config["num_hidden_layers"]
        n_experts = config.get("num_experts")
        if n_experts is None:
            n_experts = config.get("num_local_experts", 0)
        step = config.get("decoder_sparse_step", 1) or 1
        dense = set(config.get("mlp_only_layers") or [])
        sparse = [i not in dense and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers)]
        return cls(
            model_type=config.get("model_type", "qwen3_moe"),
            hidden_size=config["hidden_size"],
            num_hidden_layers=n_layers,
            intermediate_size=config["intermediate_size"],
            moe_intermediate_size=config.get("moe_intermediate_size", config["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            vocab_size=config["vocab_size"],
            num_experts=n_experts,
            num_experts_per_tok=config.get("num_experts_per_tok", 8),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),
            sparse_layers=sparse,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            sliding_window=config.get("sliding_window") if config.get("use_sliding_window") else None,
            rope=rope_parameters(config),
        )


class DecoderLayer(PreNormDecoderLayer):
    def __init__(self, args: ModelArgs, sparse: bool):
        if sparse:
            mlp = SparseMoE(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                            args.num_experts_per_tok, scoring="softmax",
                            norm_topk_prob=args.norm_topk_prob)
        else:
            mlp = MLP(args.hidden_size, args.intermediate_size)
        super().__init__(args, Attention(args, args.sliding_window), mlp)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, [DecoderLayer(args, s) for s in args.sparse_layers])

    def sanitize(self, weights: dict) -> dict:
        """HF per-expert or fused experts -> stacked `switch_mlp`; mlx-lm's layout passes."""
        weights = drop_unused(weights, self.args.tie_word_embeddings)
        for i, sparse in enumerate(self.args.sparse_layers):
            if sparse:
                stack_experts(weights, f"model.layers.{i}.mlp", self.args.num_experts)
        return weights
