"""The attention block and pre-norm decoder layer that Llama, Qwen3 and Qwen3-MoE share.

`GQAAttention`: q/k/v projections (fusable into one `qkv_proj` at decode), optional per-head
q/k RMSNorm (Qwen3), RoPE, causal attention over the cache (optionally a sliding window) and
the output projection. It is split into `project` / `attend` / `output` so that the compiled
decode step (base.CompiledDecoder) can compile everything between two attentions.
`PreNormDecoderLayer`: x + attn(norm(x)), then h + mlp(norm(h)), with the same split.
Weight names follow Hugging Face (`self_attn.q_proj`, `self_attn.q_norm`, `mlp`,
`input_layernorm`, `post_attention_layernorm`).
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from marlin_mlx.kernels import Linear, fused_linear, qk_rope

from .base import MLP, RMSNorm, RoPE, attention, fuse_linears
from .cache import KVCache


class GQAAttention(nn.Module):
    def __init__(self, args, *, bias: bool = False, qk_norm: bool = False,
                 window: Optional[int] = None):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.window = window
        self.q_proj = Linear(args.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size, bias=bias)
        if qk_norm:
            # normalizes each head's vector, so the weight has head_dim entries
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self._norm_eps = args.rms_norm_eps
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

    def project(self, x: mx.array, offset, norm: Optional[RMSNorm] = None, cache=None) -> tuple:
        """q, k, v as (B, heads, L, head_dim) of norm(x) (when a norm is given), q and k normed
        (Qwen3) and rotated from `offset`.

        With q/k/v fused, a GPU decode step can run the input norm inside the projection's
        launch and the split, q/k norms and RoPE as one launch (kernels.fused_linear,
        kernels.qk_rope), each where the selection measured it faster. Inside a compiled whole
        step whose cache offers `row_targets` (models/cache.py KVCacheTrace, CUDA), that launch
        also writes k and v into the cache, and they come back as None."""
        B, L, _ = x.shape
        qk_norm = "q_norm" in self
        if "qkv_proj" in self:
            nq, nk = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            qkv = None if norm is None else fused_linear.norm_linear(x, norm["weight"], norm.eps,
                                                                      self.qkv_proj)
            if qkv is None:
                qkv = self.qkv_proj(x if norm is None else norm(x))
            rope = self.rope
            qn = self["q_norm"]["weight"] if qk_norm else None
            if L == 1 and qk_rope.use_kernel(qkv, self.n_heads, self.n_kv_heads, self.head_dim,
                                             offset, rope.base, rope._freqs, qn,
                                             self._norm_eps, rope.scale):
                targets = getattr(cache, "row_targets", lambda: None)()
                return qk_rope.qk_norm_rope(qkv, self.n_heads, self.n_kv_heads, self.head_dim,
                                            offset, rope._inv_freq, qn,
                                            self["k_norm"]["weight"] if qk_norm else None,
                                            self._norm_eps, rope.scale, cache=targets)
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        else:
            if norm is not None:
                x = norm(x)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if L == 1:  # (B, 1, H*D) is (B, H, 1, D) in memory: no transpose nodes at decode
            q = q.reshape(B, self.n_heads, 1, -1)
            k = k.reshape(B, self.n_kv_heads, 1, -1)
            if qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            v = v.reshape(B, self.n_kv_heads, 1, -1)
        else:
            q = q.reshape(B, L, self.n_heads, -1)
            k = k.reshape(B, L, self.n_kv_heads, -1)
            if qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
            v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.rope(q, offset), self.rope(k, offset), v

    def attend(self, q, k, v, cache=None) -> mx.array:
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return attention(q, k, v, self.scale, window=self.window, cache=cache)

    def output(self, out: mx.array, residual: Optional[mx.array] = None) -> mx.array:
        """o_proj of the heads' outputs, plus `residual` when given (fused into the projection's
        launch at batch-1 decode on a GPU, where measured faster)."""
        B, _, L, _ = out.shape
        if L > 1:
            out = out.transpose(0, 2, 1, 3)
        out = out.reshape(B, L, -1)
        if residual is None:
            return self.o_proj(out)
        y = fused_linear.linear_residual(out, self.o_proj, residual)
        return y if y is not None else residual + self.o_proj(out)

    def __call__(self, x: mx.array, cache: Optional[KVCache] = None) -> mx.array:
        q, k, v = self.project(x, cache.offset if cache is not None else 0)
        return self.output(self.attend(q, k, v, cache))


class PreNormDecoderLayer(nn.Module):
    supports_compiled_decode = True  # splits into attn_in / attend / attn_out (CompiledDecoder)

    def __init__(self, args, attn: GQAAttention, mlp: nn.Module):
        super().__init__()
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def attn_in(self, x: mx.array, offset, cache=None) -> tuple:
        return self.self_attn.project(x, offset, norm=self.input_layernorm, cache=cache)

    def attend(self, q, k, v, cache=None) -> mx.array:
        return self.self_attn.attend(q, k, v, cache)

    def attn_out(self, x: mx.array, attn: mx.array) -> mx.array:
        h = self.self_attn.output(attn, residual=x)
        if type(self.mlp) is MLP:
            return self.mlp.norm_residual(h, self.post_attention_layernorm)
        return h + self.mlp(self.post_attention_layernorm(h))

    def __call__(self, x: mx.array, cache: Optional[KVCache] = None) -> mx.array:
        q, k, v = self.attn_in(x, cache.offset if cache is not None else 0)
        return self.attn_out(x, self.attend(q, k, v, cache))
