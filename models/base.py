"""Pieces the decoder-only models share: config reading, RoPE variants, attention, MLP, norms.

Config reading accepts both spellings found in `config.json` files:
- transformers 5 writes `rope_parameters = {"rope_theta": ..., "rope_type": ..., <scaling fields>}`;
- older hub checkpoints carry `rope_theta` at the top level and an optional `rope_scaling` dict
  whose type sits under `type` or `rope_type`.
"""

import math
import os
import warnings
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from marlin_mlx.kernels import Linear, QuantizedLinear, flash_attention, fused_linear
from marlin_mlx.kernels.qk_rope import inv_freq_table

from .cache import KVCache

DEFAULT_ROPE_THETA = 10000.0
# CompiledDecoder: one compiled function per step where the caches allow ("whole"), else one
# per layer boundary ("layers")
WHOLE_STEP = os.environ.get("MARLIN_MLX_COMPILE_STEP", "whole").strip() != "layers"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(config: dict) -> dict:
    """One flat dict with `rope_type`, `rope_theta` and the scaling fields, from either spelling.

    `original_max_position_embeddings` is filled in from `max_position_embeddings` for the
    scaled types when missing, as transformers does.
    """
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported by this model")
    merged: dict[str, Any] = {}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        merged.update(scaling)
    if isinstance(params, dict):
        merged.update(params)  # the transformers 5 spelling wins where both are present
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    merged["rope_type"] = rope_type
    theta = merged.get("rope_theta")
    if theta is None:
        theta = config.get("rope_theta")
    if theta is None:
        theta = DEFAULT_ROPE_THETA
    merged["rope_theta"] = float(theta)
    if rope_type in ("llama3", "yarn"):
        # transformers prefers a top-level original_max_position_embeddings (Phi3-style configs)
        top = config.get("original_max_position_embeddings")
        if top is not None:
            merged["original_max_position_embeddings"] = top
        elif merged.get("original_max_position_embeddings") is None:
            merged["original_max_position_embeddings"] = config.get("max_position_embeddings")
    return merged


def _llama3_inv_freq(inv_freq: mx.array, p: dict) -> mx.array:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_ctx = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = mx.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return mx.where(medium, smoothed, scaled)


def _yarn_factor(p: dict, max_position_embeddings: Optional[int]) -> float:
    if p.get("factor") is not None:
        return float(p["factor"])
    # transformers: without a factor, the ratio of the new to the pre-training context
    return float(max_position_embeddings) / float(p["original_max_position_embeddings"])


def yarn_attention_factor(p: dict, max_position_embeddings: Optional[int] = None) -> float:
    """The factor YaRN multiplies cos/sin by (transformers' `attention_factor`)."""
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = _yarn_factor(p, max_position_embeddings)
    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    if m and m_all:
        return mscale(factor, m) / mscale(factor, m_all)
    return mscale(factor)


def _yarn_inv_freq(dim: int, base: float, p: dict,
                   max_position_embeddings: Optional[int]) -> mx.array:
    orig = float(p["original_max_position_embeddings"])
    factor = _yarn_factor(p, max_position_embeddings)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = mx.clip((mx.arange(dim // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # weight of the unscaled frequency
    pos_freqs = base ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim)
    return (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation


class RoPE(nn.Module):
    """Rotary embedding over the whole head (half-split layout, as HF's `rotate_half`).

    Custom frequency tables (llama3, yarn, linear) go to `mx.fast.rope` as `freqs`, which takes
    wavelengths (1 / inv_freq). YaRN's attention factor scales q and k, which equals scaling
    cos and sin as transformers does.
    """

    def __init__(self, dims: int, params: dict, max_position_embeddings: Optional[int] = None):
        super().__init__()
        self.dims = dims
        self.rope_type = params["rope_type"]
        base = params["rope_theta"]
        self.scale = 1.0
        inv_freq = None
        if self.rope_type == "default":
            self.base = base
        else:
            inv_freq = 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
            if self.rope_type == "linear":
                inv_freq = inv_freq / float(params["factor"])
            elif self.rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, params)
            elif self.rope_type == "yarn":
                inv_freq = _yarn_inv_freq(dims, base, params, max_position_embeddings)
                self.scale = yarn_attention_factor(params, max_position_embeddings)
            else:
                raise ValueError(
                    f"rope type {self.rope_type!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
                )
            self.base = None
        # stored with a leading underscore so it is not a parameter (not saved, not loaded)
        self._freqs = None if inv_freq is None else 1.0 / inv_freq
        # the same frequencies for the fused decode kernel (kernels.qk_rope)
        self._inv_freq = inv_freq_table(dims, self.base, self._freqs)
        # computed now: left lazy, a compiled decode step would rebuild them (two launches per
        # layer per token: GLM-4.7-Flash's CUPTI profile showed 94 of them)
        mx.eval([t for t in (self._freqs, self._inv_freq) if t is not None])

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.scale != 1.0:
            x = x * self.scale
        return mx.fast.rope(x, self.dims, traditional=False, base=self.base, scale=1.0,
                            offset=offset, freqs=self._freqs)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, window: Optional[int] = None,
              cache=None):
    """Causal attention of q (B, H, L, D) over k/v (B, KV, S, D) with S >= L (cache in front).

    The queries are the last L positions; MLX's "causal" mask aligns the last query with the
    last key, which is what a prefill after cached tokens needs. GQA is handled by the kernel.
    `window` limits each query to the last `window` keys (sliding-window layers).
    A cache with an `attend(q, k, v, scale, window)` method (the serving engine's paged
    caches, MLACache at decode) computes the attention itself over its own storage unless it
    returns None; other caches change nothing.
    """
    attend = getattr(cache, "attend", None)
    if attend is not None:
        out = attend(q, k, v, scale, window)
        if out is not None:
            return out
    L, S = q.shape[2], k.shape[2]
    if window is not None and S > window:
        qpos = mx.arange(S - L, S)[:, None]
        kpos = mx.arange(S)[None, :]
        mask = (kpos <= qpos) & (kpos > qpos - window)
    else:
        if L > 1 and max(q.shape[-1], v.shape[-1]) > flash_attention.FUSED_MAX:
            # heads MLX's CUDA attention does not fuse (GLM's prefill): our one-pass kernel
            return flash_attention.flash_attention(q, k, v, scale)
        mask = "causal" if L > 1 else None
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). For quantized gate/up at decode,
    kernels.swiglu runs both projections and the activation as one fused launch."""

    from marlin_mlx.kernels import swiglu as _swiglu
    _swiglu = staticmethod(_swiglu)

    def __init__(self, dims: int, hidden_dims: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dims, hidden_dims, bias=bias)
        self.up_proj = Linear(dims, hidden_dims, bias=bias)
        self.down_proj = Linear(hidden_dims, dims, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self._swiglu(x, self.gate_proj, self.up_proj))

    def norm_residual(self, h: mx.array, norm: "RMSNorm") -> mx.array:
        """h + self(norm(h)). At batch-1 decode on a GPU the norm rides in the gate/up launch
        and the residual add in the down projection's (kernels.fused_linear), where measured
        faster."""
        a = fused_linear.norm_swiglu(h, norm["weight"], norm.eps, self.gate_proj, self.up_proj)
        if a is None:
            a = self._swiglu(norm(h), self.gate_proj, self.up_proj)
        y = fused_linear.linear_residual(a, self.down_proj, h)
        return y if y is not None else h + self.down_proj(a)


def check_activation(config: dict) -> None:
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported (only silu)")


def drop_unused(weights: dict, tie_word_embeddings: bool) -> dict:
    """HF names stay; rotary buffers and a tied head's duplicate copy go."""
    out = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if tie_word_embeddings:
        out = {k: v for k, v in out.items() if not k.startswith("lm_head.")}
    return out


# Prefill pipelining (DecoderStack): prompts of at least PIPELINE_MIN_TOKENS tokens filling a
# cache are handed to the GPU every PIPELINE_LAYERS layers; MARLIN_MLX_PREFILL_PIPELINE=0 turns
# it off.
PIPELINE_LAYERS = 0 if os.environ.get("MARLIN_MLX_PREFILL_PIPELINE", "1").strip() == "0" else 4
PIPELINE_MIN_TOKENS = 64


class DecoderStack(nn.Module):
    """Token embedding, the decoder layers and the final norm: the body every model here shares
    (HF names: `model.embed_tokens`, `model.layers.N`, `model.norm`)."""

    def __init__(self, args, layers: list):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(inputs)
        # A long prompt filling a cache: hand every few layers to the GPU while Python builds
        # the next ones. MLX runs nothing until asked, so building a whole prefill graph first
        # (~0.5 ms a layer for GLM-4.7-Flash) would add to the time to first token. Only with
        # a cache: calls without one may be inside mx.grad / mx.compile (calibration,
        # training), where MLX refuses async_eval.
        every = (PIPELINE_LAYERS if cache is not None and inputs.shape[-1] >= PIPELINE_MIN_TOKENS
                 else 0)
        cache = cache or [None] * len(self.layers)
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, c)
            if every and i % every == every - 1:
                mx.async_eval(h)
        return self.norm(h)


class CausalLM(nn.Module):
    """A decoder stack with its output head (tied to the embedding or `lm_head`) and the model
    contract the runtime relies on: `__call__(inputs, cache)`, `layers`, `make_cache`, `sanitize`."""

    cache_class = KVCache

    def __init__(self, args, layers: list):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DecoderStack(args, layers)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.head(self.model(inputs, cache))

    def head(self, h: mx.array) -> mx.array:
        """Logits of final-normed hidden states."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def fuse_projections(self) -> int:
        """Fuse each attention's q/k/v into one projection where the layer supports it (one
        launch instead of three per layer at decode; outputs unchanged). Returns how many
        layers were fused by this call."""
        n = sum(bool(getattr(layer.self_attn, "fuse_qkv", lambda: False)())
                for layer in self.layers)
        if n:  # a compiled decoder traced before holds the old modules
            self.__dict__.pop("_compiled_decoder", None)
        return n

    def compiled_decoder(self) -> Optional["CompiledDecoder"]:
        """The compiled single-token step for this model (built once), or None when a layer
        does not split into `attn_in` / `attend` / `attn_out` (MoE layers, MLA)."""
        dec = self.__dict__.get("_compiled_decoder")
        if dec is None and all(getattr(layer, "supports_compiled_decode", False)
                               for layer in self.layers):
            dec = CompiledDecoder(self)
            object.__setattr__(self, "_compiled_decoder", dec)  # not a child module
        return dec

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> list:
        return [self.cache_class() for _ in self.layers]

    def sanitize(self, weights: dict) -> dict:
        return drop_unused(weights, self.args.tie_word_embeddings)


def fuse_linears(mods: list) -> Optional[nn.Module]:
    """One layer computing the concatenated outputs of `mods` (same input), or None when they
    cannot share one matmul (different quantization, mixed bias, other layer types). Rows of
    the outputs are independent, so the fused layer gives each part's values."""
    first = mods[0]
    if any(type(m) is not type(first) for m in mods):
        return None
    has_bias = ["bias" in m for m in mods]
    if any(b != has_bias[0] for b in has_bias):
        return None
    cat = lambda name: mx.concatenate([m[name] for m in mods], axis=0)  # noqa: E731
    if type(first) is QuantizedLinear:
        if any((m.group_size, m.bits, m.mode) != (first.group_size, first.bits, first.mode)
               or m["weight"].ndim != 2 for m in mods):
            return None
        fused = QuantizedLinear.__new__(QuantizedLinear)
        nn.Module.__init__(fused)
        fused.group_size, fused.bits, fused.mode = first.group_size, first.bits, first.mode
        names = ["weight", "scales"] + (["biases"] if "biases" in first else [])
    elif type(first) is nn.Linear:
        fused = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(fused)
        names = ["weight"]
    else:
        return None
    for name in names + (["bias"] if has_bias[0] else []):
        fused[name] = cat(name)
    if type(first) is QuantizedLinear:
        fused.freeze()
    mx.eval(fused.parameters())
    return fused


class CompiledDecoder:
    """A single-token decode step of a CausalLM whose layers split into `attn_in(x, offset)
    -> (q, k, v)` (or any tuple of arrays, e.g. MLA's (q, cache rows)), `attend(*that, cache)`
    and `attn_out(x, attn)`.

    Everything between two attentions (the previous layer's output projection, residuals, MLP
    and the next layer's norm, q/k/v projection, q/k norms and RoPE) is one `mx.compile`d
    function per layer boundary, so a token replays compiled graphs instead of re-running
    their Python, and MLX fuses their elementwise ops. The cache writes and the attention stay
    outside, unchanged (the cache's length needs no fixed shape). Caches other than KVCache go
    through the plain model unless they declare `compiled_decode` (the serving engine's paged
    caches in a decode step: their offset is already an array of per-sequence positions).
    RoPE takes the position as an array, so one trace serves every step; MLX retraces only for
    a new batch size or dtype. The first call per input shape runs the plain model (kernel
    selection and compilation happen outside the trace, where they may evaluate arrays).

    When every cache can be traced (`traced_decode`: MLACache on its paged path, KVCache when it
    attends through the buffer kernel; the write is a slice update at an array position or the
    rope / query kernel's in-place write, and the attention masks by length arrays), the whole
    step is one compiled function instead: no Python runs per layer at all (GLM-4.7-Flash on
    the H200: 1.2 ms of graph building a token instead of 2.7). It retraces when the caches grow
    (every `step` tokens). MARLIN_MLX_COMPILE_STEP=layers keeps the per-layer split.
    """

    def __init__(self, model: CausalLM):
        self.model = model
        stack, layers = model.model, model.layers
        n = len(layers)

        def first(tokens, offset):
            x = stack.embed_tokens(tokens)
            return (x, *layers[0].attn_in(x, offset))

        def between(i):
            def seg(x, attn, offset):
                h = layers[i - 1].attn_out(x, attn)
                return (h, *layers[i].attn_in(h, offset))
            return seg

        def last(x, attn):
            return model.head(stack.norm(layers[n - 1].attn_out(x, attn)))

        self._first = mx.compile(first)
        self._between = [None] + [mx.compile(between(i)) for i in range(1, n)]
        self._last = mx.compile(last)
        self._wholes: dict = {}  # the caches' trace keys -> compiled whole step
        self._warm: set = set()
        self.failed: Optional[str] = None  # why the compiled path was given up, if it was

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """Logits (B, 1, vocab) of one token per sequence; other inputs go to the model."""
        if (cache is None or inputs.ndim != 2 or inputs.shape[1] != 1
                or not all(type(c) is KVCache or getattr(c, "compiled_decode", False)
                           for c in cache)):
            return self.model(inputs, cache=cache)
        key = (inputs.shape, inputs.dtype)
        if key not in self._warm or self.failed is not None:
            self._warm.add(key)
            return self.model(inputs, cache=cache)
        if WHOLE_STEP and all(getattr(c, "traced_decode", False) for c in cache):
            try:
                return self._whole_step(inputs, cache)
            except Exception as e:  # nothing was written: the caches commit after the call
                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"compiled decode step disabled, using the plain model: {self.failed}")
                return self.model(inputs, cache=cache)
        start = [c.offset for c in cache]
        try:
            return self._step(inputs, cache)
        except Exception as e:  # a trace that fails (an op that cannot be compiled)
            for c, n in zip(cache, start):
                if isinstance(n, int):
                    c.trim(c.offset - n)  # undo the layers already written (a paged write
                    # is idempotent: the plain model rewrites the same slots)
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"compiled decode step disabled, using the plain model: {self.failed}")
            return self.model(inputs, cache=cache)

    def _step(self, inputs: mx.array, cache) -> mx.array:
        layers = self.model.layers
        offset = mx.array(cache[0].offset, dtype=mx.int32)
        x, *qkv = self._first(inputs, offset)
        for i, layer in enumerate(layers):
            attn = layer.attend(*qkv, cache[i])
            if i + 1 < len(layers):
                x, *qkv = self._between[i + 1](x, attn, offset)
        return self._last(x, attn)

    def _whole_step(self, inputs: mx.array, cache) -> mx.array:
        key = tuple(c.trace_key() for c in cache)
        fn = self._wholes.get(key)
        if fn is None:
            fn = self._wholes[key] = mx.compile(self._whole_fn([type(c).traced for c in cache], key))
        offset = mx.array(cache[0].offset, dtype=mx.int32)
        logits, outs = fn(inputs, offset, [c.trace_inputs() for c in cache])
        for c, arrays in zip(cache, outs):
            c.trace_commit(arrays)
        return logits

    def _whole_fn(self, views, keys):
        """The whole step over caches traced through `views` (classes' static `traced`, so the
        compiled function holds no cache)."""
        model, stack, layers = self.model, self.model.model, self.model.layers

        def whole(tokens, offset, states):
            lens = offset + mx.ones((tokens.shape[0],), mx.int32)  # contiguous (kernel input)
            caches = [make(s, offset, lens, k) for make, s, k in zip(views, states, keys)]
            x = stack.embed_tokens(tokens)
            for layer, c in zip(layers, caches):
                x = layer.attn_out(x, layer.attend(*layer.attn_in(x, offset, cache=c), c))
            return model.head(stack.norm(x)), [c.outputs() for c in caches]
        return whole
