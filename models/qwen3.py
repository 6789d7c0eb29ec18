"""Qwen3 (dense): Llama's layout plus an RMSNorm on each query and key head before RoPE.

Differences from Llama that matter for loading: `head_dim` is set explicitly (default 128, not
hidden/heads), `q_norm`/`k_norm` weights of size head_dim, and optional sliding-window layers
(`use_sliding_window`, `max_window_layers`, `layer_types`). Weight names follow Hugging Face's
`Qwen3ForCausalLM`.
"""

from dataclasses import dataclass, field
from typing import Any, Optional


from .attention import GQAAttention, PreNormDecoderLayer
from .base import MLP, CausalLM, check_activation, rope_parameters


def _layer_windows(config: dict, n_layers: int) -> list:
    """Per layer: None for full attention, else the sliding window length (as transformers)."""
    window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
    types = config.get("layer_types")
    if types is None:
        first = config.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(n_layers)]
    return [window if t == "sliding_attention" else None for t in types]


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 1e4})
    layer_windows: Optional[list] = None

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        check_activation(config)
        heads = config["num_attention_heads"]
        n_layers = config["num_hidden_layers"]
        return cls(
            model_type=config.get("model_type", "qwen3"),
            hidden_size=config["hidden_size"],
            num_hidden_layers=n_layers,
            intermediate_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            vocab_size=config["vocab_size"],
            head_dim=config.get("head_dim") or 128,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            rope=rope_parameters(config),
            layer_windows=_layer_windows(config, n_layers),
        )


class Attention(GQAAttention):
    def __init__(self, args: ModelArgs, window: Optional[int]):
        super().__init__(args, bias=args.attention_bias, qk_norm=True, window=window)


class DecoderLayer(PreNormDecoderLayer):
    def __init__(self, args: ModelArgs, window: Optional[int]):
        super().__init__(args, Attention(args, window), MLP(args.hidden_size, args.intermediate_size))


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        windows = args.layer_windows or [None] * args.num_hidden_layers
        super().__init__(args, [DecoderLayer(args, w) for w in windows])
