"""GLM-4.7-Flash (`glm4_moe_lite`): multi-head latent attention (MLA) + sparse MoE.

Attention (DeepSeek-V2's MLA): queries through a low-rank pair (q_a_proj, q_a_layernorm,
q_b_proj); keys and values from a per-token latent (kv_lora_rank, after kv_a_layernorm) that
`kv_b_proj` expands per head into a no-rope key part (qk_nope_head_dim) and a value
(v_head_dim), plus one rope key (qk_rope_head_dim) shared by all heads. The cache holds only
the latent and the rope key (models/mla_cache.py).

`kv_b_proj` is held split per head, in mlx-lm's layout: `embed_q.weight` (H, kv_lora_rank,
nope) and `unembed_out.weight` (H, v_head_dim, kv_lora_rank). Two equivalent forms:
- expanded (prefill, L > 1): k_nope = latent @ embed_q, v = latent @ unembed_out^T, then
  ordinary attention over H heads of (nope + rope) keys;
- absorbed (decode, L == 1): the query's no-rope part is folded into latent space
  (q_nope @ embed_q^T), attention runs over the cached (latent | rope key) rows as one shared
  key/value head, and the output is mapped back per head by unembed_out. No per-head keys or
  values are ever materialized. A GPU batch-1 decode step runs the projections around the
  attention as five fused launches (kernels/mla_decode.py; q_a and kv_a stacked by `fuse_qkv`).

MLP: layer types from `mlp_layer_types` (transformers 5) or `first_k_dense_replace` /
`moe_layer_freq` (hub configs). MoE layers route with sigmoid scores, a selection-only
`e_score_correction_bias`, group-limited top-k, normalized and scaled weights, plus one shared
expert (models/moe.py). RoPE is interleaved (`rope_interleave`, pairs (x0, x1), (x2, x3), ...).
"""

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from marlin_mlx.kernels import Linear, fused_linear, mla_decode

from .base import (MLP, CausalLM, RMSNorm, RoPE, attention, check_activation, fuse_linears,
                   rope_parameters)
from .mla_cache import MLACache
from .moe import SparseMoE, stack_experts

# transformers' Glm4MoeLiteRMSNorm default; the q_a/kv_a norms are built without the config eps
LORA_NORM_EPS = 1e-6


def _mlp_layer_types(config: dict, n_layers: int) -> list:
    types = config.get("mlp_layer_types")
    if types is not None:
        if len(types) != n_layers or any(t not in ("dense", "sparse") for t in types):
            raise ValueError(f"mlp_layer_types must list 'dense'/'sparse' for {n_layers} layers: {types}")
        return list(types)
    if not config.get("n_routed_experts"):
        return ["dense"] * n_layers
    first = config.get("first_k_dense_replace", 1)
    freq = config.get("moe_layer_freq", 1) or 1
    return ["sparse" if i >= first and i % freq == 0 else "dense" for i in range(n_layers)]


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: Optional[int]
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 4
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    mlp_layer_types: list = field(default_factory=list)
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 202752
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    rope_interleave: bool = True
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 1e6})

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        check_activation(config)
        if config.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"topk_method {config['topk_method']!r} is not supported (only noaux_tc)")
        if config.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"scoring_func {config['scoring_func']!r} is not supported (only sigmoid)")
        rope = rope_parameters(config)
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor {partial} is not supported (only 1.0)")
        n_layers = config["num_hidden_layers"]
        return cls(
            model_type=config.get("model_type", "glm4_moe_lite"),
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            moe_intermediate_size=config.get("moe_intermediate_size", config["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=config["num_attention_heads"],
            kv_lora_rank=config["kv_lora_rank"],
            q_lora_rank=config.get("q_lora_rank"),
            qk_nope_head_dim=config["qk_nope_head_dim"],
            qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"],
            n_routed_experts=config.get("n_routed_experts") or config.get("num_local_experts") or 0,
            n_shared_experts=config.get("n_shared_experts") or 0,
            num_experts_per_tok=config.get("num_experts_per_tok", 4),
            n_group=config.get("n_group") or 1,
            topk_group=config.get("topk_group") or 1,
            norm_topk_prob=bool(config.get("norm_topk_prob", True)),
            routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
            mlp_layer_types=_mlp_layer_types(config, n_layers),
            rms_norm_eps=config.get("rms_norm_eps", 1e-5),
            max_position_embeddings=config.get("max_position_embeddings", 202752),
            attention_bias=bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_interleave=bool(config.get("rope_interleave", True)),
            rope=rope,
        )


def softmax_scale(args: ModelArgs) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 as transformers does."""
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    p = args.rope
    if p.get("rope_type", "default") != "default" and p.get("mscale_all_dim"):
        factor = float(p["factor"])
        if factor > 1:
            m = 0.1 * float(p["mscale_all_dim"]) * math.log(factor) + 1.0
            scale *= m * m
    return scale


class InterleavedRoPE(RoPE):
    """base.RoPE's frequencies (incl. YaRN) on adjacent pairs, as DeepSeek/GLM lay them out.

    transformers de-interleaves the rotated pairs (evens then odds) where MLX keeps them in
    place; q and k get the same permutation, so their dot products are equal.
    """

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.scale != 1.0:
            x = x * self.scale
        return mx.fast.rope(x, self.dims, traditional=True, base=self.base, scale=1.0,
                            offset=offset, freqs=self._freqs)


class PerHeadLinear(nn.Module):
    """One (out, in) matrix per head: `weight` (H, out, in); x (..., H, L, in) -> (..., H, L, out).

    `transpose=False` multiplies by the matrix itself instead: x (..., L, out) -> (..., H, L, in).
    """

    def __init__(self, input_dims: int, output_dims: int, num_heads: int):
        super().__init__()
        self.weight = mx.zeros((num_heads, output_dims, input_dims))

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        return x @ (self.weight.swapaxes(-1, -2) if transpose else self.weight)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        H, out_dims, in_dims = self.weight.shape
        q = QuantizedPerHeadLinear(in_dims, out_dims, H, group_size, bits, mode)
        packed = mx.quantize(self.weight, group_size=group_size, bits=bits, mode=mode)
        q.weight, q.scales = packed[0], packed[1]
        if mode == "affine":
            q.biases = packed[2]
        return q


class QuantizedPerHeadLinear(nn.Module):
    """PerHeadLinear quantized along its last axis (mlx-lm's QuantizedMultiLinear layout)."""

    def __init__(self, input_dims: int, output_dims: int, num_heads: int, group_size: int = 64,
                 bits: int = 4, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        packed = mx.quantize(mx.zeros((num_heads, output_dims, input_dims)), group_size=group_size,
                             bits=bits, mode=mode)
        self.weight, self.scales = packed[0], packed[1]
        if mode == "affine":
            self.biases = packed[2]
        self.freeze()

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        return mla_decode.per_head_matmul(x, self.weight, self.scales, self.get("biases"),
                                          self.group_size, self.bits, transpose, self.mode)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = H = args.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.rank = args.kv_lora_rank
        self.q_lora_rank = args.q_lora_rank
        qk_dim = self.nope + self.rope_dim
        bias = args.attention_bias
        if args.q_lora_rank is None:
            self.q_proj = Linear(args.hidden_size, H * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(args.hidden_size, args.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = Linear(args.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(args.hidden_size, self.rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LORA_NORM_EPS)
        self.embed_q = PerHeadLinear(self.nope, self.rank, H)
        self.unembed_out = PerHeadLinear(self.rank, self.v_dim, H)
        self.o_proj = Linear(H * self.v_dim, args.hidden_size, bias=bias)
        self.scale = softmax_scale(args)
        rope_cls = InterleavedRoPE if args.rope_interleave else RoPE
        self.rope = rope_cls(self.rope_dim, args.rope, args.max_position_embeddings)
        # None: absorbed for single-token steps, expanded otherwise; "absorbed"/"expanded" force one
        self.form = None

    def fuse_qkv(self) -> bool:
        """Replace q_a_proj and kv_a_proj_with_mqa (same input) by one `qkv_a_proj` with their
        outputs concatenated: one launch instead of two, and the row the fused decode kernels
        read (kernels/mla_decode.py). False when already fused, without q_a, or not fusable."""
        if self.q_lora_rank is None or "qkv_a_proj" in self:
            return False
        fused = fuse_linears([self.q_a_proj, self.kv_a_proj_with_mqa])
        if fused is None:
            return False
        self.pop("q_a_proj")
        self.pop("kv_a_proj_with_mqa")
        self.qkv_a_proj = fused
        return True

    def _a_projections(self, x: mx.array) -> tuple:
        """(q_a output or None without q_lora_rank, kv_a output)."""
        if "qkv_a_proj" in self:
            a = self.qkv_a_proj(x)
            return a[..., : self.q_lora_rank], a[..., self.q_lora_rank :]
        return (None if self.q_lora_rank is None else self.q_a_proj(x)), self.kv_a_proj_with_mqa(x)

    def _project(self, x: mx.array, offset):
        """(q_nope, q_pe, latent, k_pe) of x (B, L, hidden), RoPE applied at `offset`."""
        B, L, _ = x.shape
        q_a, kv = self._a_projections(x)
        q = self.q_proj(x) if q_a is None else self.q_b_proj(self.q_a_layernorm(q_a))
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        q_nope, q_pe = q[..., : self.nope], q[..., self.nope :]
        latent = self.kv_a_layernorm(kv[..., : self.rank]).reshape(B, 1, L, self.rank)
        k_pe = kv[..., self.rank :].reshape(B, 1, L, self.rope_dim)
        return q_nope, self.rope(q_pe, offset), latent, self.rope(k_pe, offset)

    # The compiled decode step's split (models/base.py CompiledDecoder), absorbed form only:
    # project -> (absorbed query, cache row (latent | rope key)); attend over the cache; output
    # projection. A GPU batch-1 step runs them as kernels/mla_decode.py's fused launches.
    def project(self, x: mx.array, offset, norm: Optional[RMSNorm] = None, cache=None) -> tuple:
        """(q (B, H, L, rank + rope), cache rows (B, 1, L, rank + rope)) of norm(x); the rows
        are None where the fused kernel wrote them into `cache`'s `row_target()`."""
        if "qkv_a_proj" in self and norm is not None:
            a = fused_linear.norm_linear(x, norm["weight"], norm.eps, self.qkv_a_proj)
            target = getattr(cache, "row_target", lambda: None)()
            fused = None if a is None else mla_decode.absorbed_query(self, a, offset, target)
            if fused is not None:
                return fused
        if norm is not None:
            x = norm(x)
        q_nope, q_pe, latent, k_pe = self._project(x, offset)
        q = mx.concatenate([self.embed_q(q_nope), q_pe], axis=-1)
        return q, mx.concatenate([latent, k_pe.astype(latent.dtype)], axis=-1)

    def attend(self, q, rows, cache=None) -> mx.array:
        entries = cache.append(rows, self.rank)
        return attention(q, entries, entries[..., : self.rank], self.scale, cache=cache)

    def output(self, out: mx.array, residual: Optional[mx.array] = None) -> mx.array:
        """o_proj of the absorbed attention's out (B, H, L, rank), plus `residual` if given."""
        B, _, L, _ = out.shape
        v = mla_decode.heads_linear(self.unembed_out, out)
        if v is None:
            v = self.unembed_out(out).transpose(0, 2, 1, 3).reshape(B, L, -1)
        if residual is not None:
            y = fused_linear.linear_residual(v, self.o_proj, residual)
            if y is not None:
                return y
        y = self.o_proj(v)
        return y if residual is None else residual + y

    def __call__(self, x: mx.array, cache: Optional[MLACache] = None) -> mx.array:
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q_nope, q_pe, latent, k_pe = self._project(x, offset)
        if cache is not None:
            entries = cache.update_and_fetch(latent, k_pe)  # (B, 1, S, rank + rope)
        else:
            entries = mx.concatenate([latent, k_pe], axis=-1)
        form = self.form or ("absorbed" if L == 1 else "expanded")
        if form == "absorbed":
            out = self._absorbed(q_nope, q_pe, entries, cache)
        elif form == "expanded":
            out = self._expanded(q_nope, q_pe, entries, cache)
        else:
            raise ValueError(f"attention form {form!r} is not one of 'absorbed', 'expanded'")
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _expanded(self, q_nope, q_pe, entries, cache=None):
        latent, k_pe = entries[..., : self.rank], entries[..., self.rank :]
        k_nope = self.embed_q(latent, transpose=False)  # (B, H, S, nope)
        v = self.unembed_out(latent)  # (B, H, S, v)
        k_pe = mx.broadcast_to(k_pe, (*k_nope.shape[:-1], self.rope_dim))
        k = mx.concatenate([k_nope, k_pe], axis=-1)
        q = mx.concatenate([q_nope, q_pe], axis=-1)
        return attention(q, k, v, self.scale, cache=cache)

    def _absorbed(self, q_nope, q_pe, entries, cache=None):
        # q_nope . (W_k latent) == (W_k^T q_nope) . latent: score against the latent directly
        q = mx.concatenate([self.embed_q(q_nope), q_pe], axis=-1)  # (B, H, L, rank + rope)
        out = attention(q, entries, entries[..., : self.rank], self.scale, cache=cache)  # (B, H, L, rank)
        return self.unembed_out(out)  # (B, H, L, v)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.self_attn = Attention(args)
        if layer_type == "sparse":
            self.mlp = SparseMoE(
                args.hidden_size, args.moe_intermediate_size, args.n_routed_experts,
                args.num_experts_per_tok, scoring="sigmoid", norm_topk_prob=args.norm_topk_prob,
                n_group=args.n_group, topk_group=args.topk_group,
                routed_scaling_factor=args.routed_scaling_factor, n_shared_experts=args.n_shared_experts,
            )
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    @property
    def supports_compiled_decode(self) -> bool:
        return self.self_attn.form in (None, "absorbed")

    def attn_in(self, x: mx.array, offset, cache=None) -> tuple:
        return self.self_attn.project(x, offset, norm=self.input_layernorm, cache=cache)

    def attend(self, q, rows, cache=None) -> mx.array:
        return self.self_attn.attend(q, rows, cache)

    def attn_out(self, x: mx.array, attn: mx.array) -> mx.array:
        h = self.self_attn.output(attn, residual=x)
        if isinstance(self.mlp, SparseMoE):
            return self.mlp.residual_call(h, self.post_attention_layernorm)
        return h + self.mlp(self.post_attention_layernorm(h))

    def __call__(self, x: mx.array, cache: Optional[MLACache] = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(CausalLM):
    cache_class = MLACache

    def __init__(self, args: ModelArgs):
        super().__init__(args, [DecoderLayer(args, t) for t in args.mlp_layer_types])

    @property
    def cast_predicate(self):
        """Names a loader may cast to the compute dtype: not the router's weight and selection
        bias, which transformers keeps in float32 (a bf16 bias would change expert choices)."""
        return lambda k: not (k.endswith(".mlp.gate.weight") or k.endswith(".e_score_correction_bias"))

    def sanitize(self, weights: dict) -> dict:
        """HF hub / transformers / mlx-lm layouts -> this model's names (see `_split_kv_b`)."""
        a = self.args
        out = {}
        for k, v in weights.items():
            parts = k.split(".")
            # the MTP (next-token prediction) layer sits after the last decoder layer: unused
            if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= a.num_hidden_layers:
                continue
            if "rotary_emb.inv_freq" in k or (a.tie_word_embeddings and k.startswith("lm_head.")):
                continue
            if not self.cast_predicate(k) and v.dtype in (mx.float16, mx.bfloat16):
                # the router computes in float32 (as transformers does): convert its weight
                # once here rather than on every token
                v = v.astype(mx.float32)
            out[k] = v
        for i, t in enumerate(a.mlp_layer_types):
            if t == "sparse":
                stack_experts(out, f"model.layers.{i}.mlp", a.n_routed_experts)
            _split_kv_b(out, f"model.layers.{i}.self_attn", a)
        return out


def _split_kv_b(weights: dict, prefix: str, a: ModelArgs) -> None:
    """`kv_b_proj.weight` (H*(nope+v), rank) -> embed_q (H, rank, nope), unembed_out (H, v, rank).

    A quantized kv_b_proj (mlx-lm's older conversions) keeps its packing for unembed_out (the
    same rows, quantized along the same axis); embed_q is transposed, so it is dequantized and
    requantized with the same bits and group size along its new last axis.
    """
    name = f"{prefix}.kv_b_proj.weight"
    if name not in weights:
        return
    H, nope, rank = a.num_attention_heads, a.qk_nope_head_dim, a.kv_lora_rank
    w = weights.pop(name)
    scales = weights.pop(f"{prefix}.kv_b_proj.scales", None)
    biases = weights.pop(f"{prefix}.kv_b_proj.biases", None)

    def per_head(t):
        return t.reshape(H, nope + a.v_head_dim, t.shape[-1])

    if scales is None:
        w = per_head(w)
        weights[f"{prefix}.embed_q.weight"] = mx.contiguous(w[:, :nope, :].swapaxes(-1, -2))
        weights[f"{prefix}.unembed_out.weight"] = mx.contiguous(w[:, nope:, :])
        return
    bits = w.shape[-1] * 32 // rank
    group_size = rank // scales.shape[-1]
    for part, t in (("weight", w), ("scales", scales), ("biases", biases)):
        if t is not None:
            weights[f"{prefix}.unembed_out.{part}"] = mx.contiguous(per_head(t)[:, nope:, :])
    k_rows = mx.dequantize(per_head(w)[:, :nope, :], per_head(scales)[:, :nope, :],
                           None if biases is None else per_head(biases)[:, :nope, :],
                           group_size=group_size, bits=bits)
    packed = mx.quantize(mx.contiguous(k_rows.swapaxes(-1, -2)), group_size=group_size, bits=bits)
    for part, t in zip(("weight", "scales", "biases"), packed):
        weights[f"{prefix}.embed_q.{part}"] = t
