"""Llama (1/2/3/3.1+): pre-norm decoder with RoPE, GQA attention and a SwiGLU MLP.

Weight names follow Hugging Face's `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj.weight`,
`lm_head.weight`, ...), so checkpoints load without renaming.
"""

from dataclasses import dataclass, field
from typing import Any


from .attention import GQAAttention, PreNormDecoderLayer
from .base import MLP, CausalLM, check_activation, rope_parameters


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 1e4})

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        check_activation(config)
        heads = config["num_attention_heads"]
        return cls(
            model_type=config.get("model_type", "llama"),
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            vocab_size=config["vocab_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            rope=rope_parameters(config),
        )


class Attention(GQAAttention):
    def __init__(self, args: ModelArgs):
        super().__init__(args, bias=args.attention_bias)


class DecoderLayer(PreNormDecoderLayer):
    def __init__(self, args: ModelArgs):
        super().__init__(args, Attention(args),
                         MLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias))


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, [DecoderLayer(args) for _ in range(args.num_hidden_layers)])
