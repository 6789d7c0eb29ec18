"""Llama (1/2/3/3.1+): pre-norm decoder with RoPE, GQA attention and a SwiGLU MLP.

Weight names follow Hugging Face's `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj.weight`,
`lm_head.weight`, ...), so checkpoints load without renaming.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from marlin_mlx.kernels import Linear

from .base import (MLP, CausalLM, RMSNorm, RoPE, attention, check_activation, fuse_linears,
                   rope_parameters)
from .cache import KVCache


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


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
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
        """q, k, v as (B, heads, L, head_dim), q and k rotated from `offset`."""
        B, L, _ = x.shape
        if "qkv_proj" in self:
            nq, nk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            qkv = self.qkv_proj(x)
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if L == 1:  # (B, 1, H*D) is (B, H, 1, D) in memory: no transpose nodes at decode
            q = q.reshape(B, self.n_heads, 1, -1)
            k = k.reshape(B, self.n_kv_heads, 1, -1)
            v = v.reshape(B, self.n_kv_heads, 1, -1)
        else:
            q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
            k = k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
            v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.rope(q, offset), self.rope(k, offset), v

    def attend(self, q, k, v, cache=None) -> mx.array:
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return attention(q, k, v, self.scale, cache=cache)

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

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
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
        super().__init__(args, [DecoderLayer(args) for _ in range(args.num_hidden_layers)])
