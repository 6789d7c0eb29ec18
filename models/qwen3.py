"""Qwen3 (dense): Llama's layout plus an RMSNorm on each query and key head before RoPE.

Differences from Llama that matter for loading: `head_dim` is set explicitly (default 128, not
hidden/heads), `q_norm`/`k_norm` weights of size head_dim, and optional sliding-window layers
(`use_sliding_window`, `max_window_layers`, `layer_types`). Weight names follow Hugging Face's
`Qwen3ForCausalLM`.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from marlin_mlx.kernels import Linear

from .base import (MLP, CausalLM, RMSNorm, RoPE, attention, check_activation, fuse_linears,
                   rope_parameters)
from .cache import KVCache


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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, window: Optional[int]):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.window = window
        bias = args.attention_bias
        self.q_proj = Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        # normalizes each head's vector, so the weight has head_dim entries
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.rope = RoPE(self.head_dim, args.rope, args.max_position_embeddings)

    def fuse_qkv(self) -> bool:
        """Replace q/k/v_proj by one `qkv_proj` (the outputs concatenated): one launch at
        decode. True when fused now; False when already fused or the three cannot share one
        matmul (different quantization or layer types)."""
        if "qkv_proj" in self:
            return False
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return False
        for name in ("q_proj", "k_proj", "v_proj"):
            self.pop(name)
        self.qkv_proj = fused
        return True

    def project(self, x: mx.array, offset) -> tuple:
        """q, k, v as (B, heads, L, head_dim), q and k normed and rotated from `offset`."""
        B, L, _ = x.shape
        if "qkv_proj" in self:
            nq, nk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            qkv = self.qkv_proj(x)
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if L == 1:  # (B, 1, H*D) is (B, H, 1, D) in memory: no transpose nodes at decode
            q = self.q_norm(q.reshape(B, self.n_heads, 1, -1))
            k = self.k_norm(k.reshape(B, self.n_kv_heads, 1, -1))
            v = v.reshape(B, self.n_kv_heads, 1, -1)
        else:
            q = self.q_norm(q.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
            k = self.k_norm(k.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
            v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.rope(q, offset), self.rope(k, offset), v

    def attend(self, q, k, v, cache=None) -> mx.array:
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return attention(q, k, v, self.scale, window=self.window, cache=cache)

    def output(self, out: mx.array) -> mx.array:
        B, _, L, _ = out.shape
        if L > 1:
            out = out.transpose(0, 2, 1, 3)
        return self.o_proj(out.reshape(B, L, -1))

    def __call__(self, x: mx.array, cache: Optional[KVCache] = None) -> mx.array:
        q, k, v = self.project(x, cache.offset if cache is not None else 0)
        return self.output(self.attend(q, k, v, cache))


class DecoderLayer(nn.Module):
    supports_compiled_decode = True  # splits into attn_in / attend / attn_out (CompiledDecoder)

    def __init__(self, args: ModelArgs, window: Optional[int]):
        super().__init__()
        self.self_attn = Attention(args, window)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def attn_in(self, x: mx.array, offset) -> tuple:
        return self.self_attn.project(self.input_layernorm(x), offset)

    def attend(self, q, k, v, cache=None) -> mx.array:
        return self.self_attn.attend(q, k, v, cache)

    def attn_out(self, x: mx.array, attn: mx.array) -> mx.array:
        h = x + self.self_attn.output(attn)
        return h + self.mlp(self.post_attention_layernorm(h))

    def __call__(self, x: mx.array, cache: Optional[KVCache] = None) -> mx.array:
        q, k, v = self.attn_in(x, cache.offset if cache is not None else 0)
        return self.attn_out(x, self.attend(q, k, v, cache))


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        windows = args.layer_windows or [None] * args.num_hidden_layers
        super().__init__(args, [DecoderLayer(args, w) for w in windows])
