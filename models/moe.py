"""Mixture-of-experts pieces shared by Qwen3-MoE and GLM-4.7-Flash.

- `route(logits, ...)`: the router as one op: scores (softmax or sigmoid), optional
  selection-only bias and group-limited selection, top-k, normalization and scaling
  (kernels/moe_router.py: a fused kernel on a GPU, plain MLX on the CPU).
- `SwitchGLU`: the routed experts over stacked weights, `__call__(x, indices, weights)` doing
  gate+up, SwiGLU, down and the weighted combine. Quantized (affine) experts go through
  kernels/moe_experts.py: two fused launches for few tokens on a GPU; for many tokens
  (prefill) the dequantize + tensor-core variant named by $MARLIN_MLX_MOE_PREFILL where it
  passed its self-test and measured faster than `mx.gather_qmm`, else `mx.gather_qmm`;
  float experts through `mx.gather_mm`. Both read only the selected experts' weights and, for
  many tokens, sort the (token, expert) pairs by expert first so each expert's weights are
  read in one run.
- `SparseMoE`: router + experts + optional shared experts, with Hugging Face / mlx-lm
  parameter names (`mlp.gate.*`, `mlp.switch_mlp.{gate,up,down}_proj.*`, `mlp.shared_experts.*`).
- `stack_experts(weights, prefix, num_experts)`: checkpoint layouts to the stacked one.

Stacked expert weights are (num_experts, out, in), as mlx-lm stores them; quantized ones
(`QuantizedSwitchLinear`) hold `weight`/`scales`/`biases` from `mx.quantize` over that
array, so mlx-lm's quantized checkpoints load unchanged.
"""

import os

import mlx.core as mx
import mlx.nn as nn

from marlin_mlx.kernels import Linear, QuantizedLinear, moe_experts, moe_router

from .base import MLP, RMSNorm

SCORING_FUNCS = moe_router.SCORING_FUNCS
# (token, expert) pairs at or above which the experts' inputs are sorted by expert (prefill)
SORT_MIN_PAIRS = moe_experts.SORT_MIN_PAIRS


def route(logits: mx.array, top_k: int, *, scoring: str = "softmax", norm_topk_prob: bool = False,
          correction_bias=None, n_group: int = 1, topk_group: int = 1,
          routed_scaling_factor: float = 1.0):
    """Router logits (..., E) -> (expert indices (..., top_k) uint32, weights (..., top_k) float32).

    The weights come from the unbiased scores; `correction_bias` (GLM/DeepSeek's
    `e_score_correction_bias`) shifts the scores used to choose experts only. With
    `n_group > 1`, experts are split into `n_group` equal groups, a group's score is the sum
    of its best two (biased) scores, and only the best `topk_group` groups may be chosen.
    Indices come in descending order of choice score (ties to the lower index). Computed in
    float32 whatever the input dtype: the fused router kernel on a GPU, its plain-MLX
    reference elsewhere (kernels/moe_router.py).
    """
    return moe_router.route(logits, top_k, scoring=scoring, norm_topk_prob=norm_topk_prob,
                            correction_bias=correction_bias, n_group=n_group,
                            topk_group=topk_group, routed_scaling_factor=routed_scaling_factor)


class SwitchLinear(nn.Module):
    """Per-expert linear layers stacked as `weight` (num_experts, out, in); no bias."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        # nn.Linear's init (loading replaces it; lazy, so never computed then). Random-weight
        # benchmarks rely on it: zero experts and a zero router send every token to experts
        # 0..k-1, which no trained model does.
        s = input_dims ** -0.5
        self.weight = mx.random.uniform(-s, s, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices,
                            sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        E, out_dims, in_dims = self.weight.shape
        q = QuantizedSwitchLinear(in_dims, out_dims, E, group_size, bits, mode)
        packed = mx.quantize(self.weight, group_size=group_size, bits=bits, mode=mode)
        q.weight, q.scales = packed[0], packed[1]
        if mode == "affine":
            q.biases = packed[2]
        return q


class QuantizedSwitchLinear(nn.Module):
    """Stacked experts quantized over the input dimension, in mlx-lm's layout."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int = 64,
                 bits: int = 4, mode: str = "affine"):
        super().__init__()
        if input_dims % group_size:
            raise ValueError(f"expert input size {input_dims} is not a multiple of group size {group_size}")
        self.group_size, self.bits, self.mode = group_size, bits, mode
        packed = mx.quantize(mx.zeros((num_experts, output_dims, input_dims)), group_size=group_size,
                             bits=bits, mode=mode)
        self.weight, self.scales = packed[0], packed[1]
        if mode == "affine":
            self.biases = packed[2]
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self.weight, self.scales, self.get("biases"), rhs_indices=indices,
                             transpose=True, group_size=self.group_size, bits=self.bits,
                             mode=self.mode, sorted_indices=sorted_indices)


class SwitchGLU(nn.Module):
    """Routed SwiGLU experts: sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)), e = indices[k]."""

    def __init__(self, dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dims, hidden_dims, num_experts)
        self.up_proj = SwitchLinear(dims, hidden_dims, num_experts)
        self.down_proj = SwitchLinear(hidden_dims, dims, num_experts)

    def _quantized(self):
        """(group_size, bits) when all three projections are affine-quantized alike, else None."""
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        if not all(isinstance(p, QuantizedSwitchLinear) and p.mode == "affine" for p in projs):
            return None
        fmt = {(p.group_size, p.bits) for p in projs}
        return fmt.pop() if len(fmt) == 1 else None

    def _shared_triples(self, shared, fmt):
        """A shared expert's quantized (gate, up, down) triples when it has this layer's format
        (so the fused kernels may take it as one more slot), else None."""
        projs = [getattr(shared, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, QuantizedLinear) and p.mode == "affine" and "bias" not in p
                   and (p.group_size, p.bits) == fmt for p in projs):
            return None
        return [(p.weight, p.scales, p.get("biases")) for p in projs]

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array, shared=None,
                 residual=None) -> mx.array:
        """x (..., D), indices and weights (..., k) -> (..., D) in x's dtype; `shared`: an
        always-active expert (a module) whose output is added; `residual`: added last (by the
        experts' down launch where the fused kernels run), its shape the result's (the rows of
        x may come flat, as the fused router returns them)."""
        lead, D = x.shape[:-1], x.shape[-1]
        k = indices.shape[-1]
        idx = mx.stop_gradient(indices).reshape(-1, k)
        n = idx.shape[0]
        fmt = self._quantized()
        if fmt is not None:
            # quantized experts: the fused decode kernels, a prefill variant or gather_qmm, as
            # measured and self-tested per shape class (kernels/moe_experts.py)
            trip = [(p.weight, p.scales, p.biases) for p in
                    (self.gate_proj, self.up_proj, self.down_proj)]
            # the residual goes in as it is: the fused path returns the sum in its shape (a
            # reshape of the same shape adds no graph node, another one does)
            y = moe_experts.switch_glu(
                x.reshape(n, D), idx, weights.reshape(n, k), *trip, group_size=fmt[0], bits=fmt[1],
                shared=None if shared is None else self._shared_triples(shared, fmt),
                shared_fn=shared, validate_inputs=False, residual=residual)
            return y.reshape(residual.shape if residual is not None else (*lead, D))
        do_sort = idx.size >= SORT_MIN_PAIRS
        if do_sort:
            # one row per (token, expert) pair, ordered by expert, so each expert's weights are
            # streamed once for all its tokens
            flat = idx.flatten()
            order = mx.argsort(flat)
            h = x.reshape(n, 1, D)[order // k]  # (n*k, 1, D)
            idx = flat[order]
        else:
            # decode: (n, 1, 1, D) against (n, k) broadcasts to one row per pair
            h = x.reshape(n, 1, 1, D)
        g = self.gate_proj(h, idx, sorted_indices=do_sort)
        u = self.up_proj(h, idx, sorted_indices=do_sort)
        y = self.down_proj(nn.silu(g) * u, idx, sorted_indices=do_sort)
        if do_sort:
            y = y[mx.argsort(order)]
        y = y.reshape(n, k, D)
        out = (y * weights.reshape(n, k, 1).astype(y.dtype)).sum(axis=1)
        out = out.reshape(*lead, D).astype(x.dtype)
        if shared is not None:
            out = out + shared(x)
        return out if residual is None else residual + out.reshape(residual.shape)


class SigmoidRouter(nn.Module):
    """GLM/DeepSeek gate: `weight` (E, D) and `e_score_correction_bias` (E,), both float32 in HF."""

    def __init__(self, dims: int, num_experts: int):
        super().__init__()
        s = dims ** -0.5  # as SwitchLinear: a random router spreads the tokens over the experts
        self.weight = mx.random.uniform(-s, s, (num_experts, dims))
        self.e_score_correction_bias = mx.zeros((num_experts,))

    def __call__(self, x: mx.array) -> mx.array:
        # logits in float32 as transformers keeps this module in float32
        return x.astype(mx.float32) @ self.weight.astype(mx.float32).T


class SparseMoE(nn.Module):
    """Router, routed experts and optional shared experts (always active, unweighted)."""

    def __init__(self, dims: int, hidden_dims: int, num_experts: int, top_k: int, *,
                 scoring: str = "softmax", norm_topk_prob: bool = False, n_group: int = 1,
                 topk_group: int = 1, routed_scaling_factor: float = 1.0, n_shared_experts: int = 0):
        super().__init__()
        if scoring not in SCORING_FUNCS:
            raise ValueError(f"scoring {scoring!r} is not supported (supported: {', '.join(SCORING_FUNCS)})")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in 1..{num_experts}")
        if n_group > 1 and (num_experts % n_group or not 0 < topk_group <= n_group):
            raise ValueError(f"n_group {n_group} / topk_group {topk_group} do not fit {num_experts} experts")
        self.top_k, self.scoring, self.norm_topk_prob = top_k, scoring, norm_topk_prob
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        # softmax routers are plain linear layers (mlx-lm quantizes them, 8-bit); sigmoid ones
        # carry the selection bias and stay in float
        self.gate = Linear(dims, num_experts, bias=False) if scoring == "softmax" \
            else SigmoidRouter(dims, num_experts)
        self.switch_mlp = SwitchGLU(dims, hidden_dims, num_experts)
        if n_shared_experts:
            self.shared_experts = MLP(dims, hidden_dims * n_shared_experts)

    def route(self, x: mx.array):
        """(indices, weights) for x (..., D)."""
        bias = self.gate.e_score_correction_bias if self.scoring == "sigmoid" else None
        return route(self.gate(x), self.top_k, scoring=self.scoring,
                     norm_topk_prob=self.norm_topk_prob, correction_bias=bias,
                     n_group=self.n_group, topk_group=self.topk_group,
                     routed_scaling_factor=self.routed_scaling_factor)

    def __call__(self, x: mx.array) -> mx.array:
        inds, weights = self.route(x)
        return self.switch_mlp(x, inds, weights,
                               shared=self.shared_experts if "shared_experts" in self else None)

    def residual_call(self, h: mx.array, norm) -> mx.array:
        """h + self(norm(h)), a decoder layer's MoE half. For a decode token on a GPU, a sigmoid
        (float32) router takes the RMSNorm, its GEMV and the routing in one launch
        (kernels/moe_router.norm_route) and the residual add rides in the experts' down
        launch; elsewhere the separate ops run."""
        if self.scoring == "sigmoid" and isinstance(norm, RMSNorm):
            fused = moe_router.norm_route(
                h, norm.weight, norm.eps, self.gate.weight, self.top_k,
                correction_bias=self.gate.e_score_correction_bias, scoring=self.scoring,
                norm_topk_prob=self.norm_topk_prob, n_group=self.n_group,
                topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
                flat=FLAT_ROUTE)
            if fused is not None:
                xn, inds, weights = fused
                return self.switch_mlp(
                    xn, inds, weights, residual=h,
                    shared=self.shared_experts if "shared_experts" in self else None)
        return h + self(norm(h))


# The fused router hands the experts its rows flat (no reshape nodes in a compiled decode
# step); MARLIN_MLX_MOE_FLAT=0 reshapes them to h's leading dims (for side-by-side timing).
FLAT_ROUTE = os.environ.get("MARLIN_MLX_MOE_FLAT", "1") != "0"

_PROJS = ("gate_proj", "up_proj", "down_proj")
_QPARTS = ("weight", "scales", "biases")


def stack_experts(weights: dict, prefix: str, num_experts: int) -> None:
    """Rewrite one MoE layer's experts, in place, to `{prefix}.switch_mlp.<proj>.<part>`.

    Accepts (under `prefix`, e.g. "model.layers.3.mlp"):
    - per-expert tensors `experts.<e>.<proj>.weight` (HF hub; also `.scales`/`.biases` when
      quantized per expert), stacked to (E, out, in);
    - transformers' fused `experts.gate_up_proj` (E, 2*I, D: gate rows then up rows) and
      `experts.down_proj` (E, D, I), with or without a `.weight` suffix;
    - the stacked `switch_mlp.*` layout (mlx-lm), left as is.
    Each source tensor is popped as it is consumed; the stacks are lazy, so loading reads
    every expert once and frees it once copied.
    """
    for proj in _PROJS:
        for part in _QPARTS:
            first = f"{prefix}.experts.0.{proj}.{part}"
            if first not in weights:
                continue
            names = [f"{prefix}.experts.{e}.{proj}.{part}" for e in range(num_experts)]
            missing = [n for n in names if n not in weights]
            if missing:
                raise ValueError(f"checkpoint lacks {missing[0]} ({len(missing)} expert tensors missing)")
            weights[f"{prefix}.switch_mlp.{proj}.{part}"] = mx.stack([weights.pop(n) for n in names])
    for suffix in ("", ".weight"):
        fused = f"{prefix}.experts.gate_up_proj{suffix}"
        if fused in weights:
            w = weights.pop(fused)
            half = w.shape[1] // 2
            weights[f"{prefix}.switch_mlp.gate_proj.weight"] = w[:, :half, :]
            weights[f"{prefix}.switch_mlp.up_proj.weight"] = w[:, half:, :]
        down = f"{prefix}.experts.down_proj{suffix}"
        if down in weights and weights[down].ndim == 3:
            weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(down)
