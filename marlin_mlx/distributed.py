"""Tensor-parallel inference across processes through MLX's own distributed layer.

Start the processes with MLX's launcher (`mlx.launch`): the `ring` backend over TCP (one
machine's loopback, or several hosts), `nccl` across NVIDIA GPUs. Every rank holds a slice of
the model and runs the same forward pass on the same inputs; the collectives are
`mx.distributed.all_sum` / `all_gather` inside the graph, so a decode step stays one lazy graph.

How each architecture is split over N ranks (Megatron-style, one all-reduce per block):
- attention (Llama, Qwen3, Qwen3-MoE): q/k/v column-parallel by heads (H/N query heads and
  KV/N key/value heads per rank, each rank its own KV cache of its heads), o_proj
  row-parallel, its partial outputs summed with `all_sum`;
- GLM's MLA: q_b_proj (or q_proj) column-parallel by heads, the per-head halves of kv_b_proj
  (embed_q, unembed_out) split by heads, o_proj row-parallel; the low-rank projections and
  the latent cache are replicated (every head reads the whole latent);
- dense MLP: gate/up column-parallel, down row-parallel + `all_sum`;
- MoE (expert parallel): each rank holds E/N routed experts, the router runs replicated, a
  rank weights only the experts it holds (the others get weight 0), the shared expert is
  column/row split, and one `all_sum` combines both;
- vocabulary projection: V/N rows per rank, logits joined with `all_gather`; a tied head
  uses the rank's rows of the (replicated) embedding table, as a view, not a copy.
Quantized layers split the same way; a row-parallel split must give every rank whole
quantization groups, otherwise loading stops with an error naming the tensor.

Loading (`marlin_mlx.loader.load(path, group=group)`) reads only each rank's slice of each
tensor from the safetensors files: `split_rule` says which axis of a checkpoint tensor is
split, whatever its layout (Hugging Face, transformers' fused experts, mlx-lm's stacked ones).
`shard_model(model, group)` splits a model already in memory instead.

Serving: rank 0's engine runs the model through `DistributedRunner` (`runner_factory`), which
sends each step's inputs to the other ranks; they run `follow(model, group)`, the same
forward on their shards and their own paged pools. Every rank must run the same collectives
in the same order: a forward is one chain of them, and independent ones (a step's header and
payload) go in separate evals, as two collectives in one eval may run in either order.

Cost: a rank evaluates all top-k routed experts of a token with the slots of experts it does
not hold pointed at its first expert and weighted 0 (shapes stay static, so decode stays one
graph); that wastes compute in prefill, not weight reads in decode.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .errors import MarlinError
from .kernels import Linear, QuantizedEmbedding, QuantizedLinear, quantized_matmul
from .models import moe as _moe
from .models.base import MLP

# module names whose output features are split (column-parallel) / input features (row-parallel)
_COLUMN = {"q_proj", "k_proj", "v_proj", "q_b_proj", "kv_b_proj", "embed_q", "unembed_out",
           "gate_proj", "up_proj", "lm_head"}
_ROW = {"o_proj", "down_proj"}
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


# ---------------------------------------------------------------- process group

def init(backend: str = "any"):
    """The global group (`mx.distributed.init`); a single-process group when not launched."""
    try:
        return mx.distributed.init(strict=False, backend=backend)
    except (RuntimeError, ValueError) as e:
        raise MarlinError(f"cannot start the distributed backend {backend!r}: {e}") from None


def broadcast_int(value: int, group) -> int:
    """Rank 0's integer on every rank (an all_sum to which the other ranks add zero)."""
    x = mx.array(value if group.rank() == 0 else 0, dtype=mx.int32)
    return int(mx.distributed.all_sum(x, group=group).item())


# ---------------------------------------------------------------- which slice of a tensor

def split_rule(name: str, ndim: int):
    """How a checkpoint (or model) tensor is split: None (replicated), ("axis", a) (rank r gets
    the r-th of N equal parts of axis a) or ("expert", e) (a per-expert tensor of expert e)."""
    if ".experts." in name or ".switch_mlp." in name:
        m = _EXPERT.search(name)
        return ("expert", int(m.group(1))) if m else ("axis", 0)  # stacked / fused (E, ...)
    parts = name.split(".")
    if len(parts) < 2:
        return None
    module, leaf = parts[-2], parts[-1]
    if module in _COLUMN:
        return ("axis", 0)
    if module in _ROW:
        return None if leaf == "bias" else ("axis", ndim - 1)  # the bias is added after the sum
    return None


def part_bounds(length: int, rank: int, size: int, name: str, axis: int, where=None) -> tuple:
    """[start, stop) of rank's equal part of an axis; a clear error when it does not divide."""
    if length % size:
        what = f"{where}: tensor" if where else "tensor"
        if name.endswith((".scales", ".biases")) and axis > 0:
            raise MarlinError(f"{what} {name!r}: its {length} quantization groups per row do not "
                              f"split into {size} equal parts (each rank needs whole groups)")
        raise MarlinError(f"{what} {name!r}: axis {axis} of length {length} does not split "
                          f"into {size} equal parts")
    n = length // size
    return rank * n, (rank + 1) * n


class ShardPlan:
    """Rank, size and the expert range of this rank; decides each tensor's local slice."""

    def __init__(self, group, num_experts: int = 0):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.experts_per_rank = num_experts // self.size if num_experts else 0

    def local_name(self, name: str, shape: tuple, where=None):
        """(local name, slice spec) or None when the tensor belongs to other ranks only.

        The spec is None (whole tensor) or (axis, start, stop)."""
        rule = split_rule(name, len(shape))
        if rule is None:
            return name, None
        kind, arg = rule
        if kind == "expert":
            first = self.rank * self.experts_per_rank
            if not first <= arg < first + self.experts_per_rank:
                return None
            return name.replace(f".experts.{arg}.", f".experts.{arg - first}.", 1), None
        start, stop = part_bounds(shape[arg], self.rank, self.size, name, arg, where)
        return name, (arg, start, stop)


def _take(v: mx.array, spec) -> mx.array:
    if spec is None:
        return v
    axis, start, stop = spec
    index = [slice(None)] * v.ndim
    index[axis] = slice(start, stop)
    return mx.contiguous(v[tuple(index)])


# ---------------------------------------------------------------- parallel layers

def _quant(m) -> Optional[dict]:
    return {"group_size": m.group_size, "bits": m.bits, "mode": m.mode} if "scales" in m else None


def _in_dims(m) -> int:
    return m.scales.shape[-1] * m.group_size if "scales" in m else m.weight.shape[-1]


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r @ W_r^T (+ bias once): the input features are split.

    `reduce=False` leaves the partial sum to the caller (the MoE block sums its routed and
    shared parts in one all-reduce)."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, group, reduce: bool = True):
        super().__init__()
        self.weight = mx.zeros((output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.group, self.reduce = group, reduce

    def _matmul(self, x):
        return x @ self.weight.T

    def __call__(self, x: mx.array) -> mx.array:
        y = self._matmul(x)
        if self.reduce:
            y = mx.distributed.all_sum(y, group=self.group)
        if "bias" in self and (self.reduce or self.group.rank() == 0):
            y = y + self.bias
        return y

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        out_dims, in_dims = self.weight.shape
        return RowParallelQuantizedLinear(in_dims, out_dims, "bias" in self, self.group,
                                          self.reduce, group_size, bits, mode)


class RowParallelQuantizedLinear(RowParallelLinear):
    def __init__(self, input_dims, output_dims, bias, group, reduce=True, group_size=64, bits=4,
                 mode="affine"):
        nn.Module.__init__(self)
        q = QuantizedLinear(input_dims, output_dims, bias, group_size, bits, mode)
        for k, v in q.items():  # weight, scales, biases, bias in QuantizedLinear's layout
            setattr(self, k, v)
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.group, self.reduce = group, reduce
        self.freeze()

    def _matmul(self, x):
        return quantized_matmul(x, self.weight, self.scales, self.get("biases"), self.group_size,
                                self.bits, self.mode)

    def to_quantized(self, *a, **k):
        return self


def gather_last_axis(y: mx.array, group) -> mx.array:
    """Concatenate every rank's y along the last axis, in rank order."""
    g = mx.distributed.all_gather(y[None], group=group)  # (N, *y.shape)
    return mx.moveaxis(g, 0, -2).reshape(*y.shape[:-1], -1)


class VocabParallelLinear(RowParallelLinear):
    """The output head: this rank's V/N rows of lm_head; full logits through all_gather."""

    def __init__(self, input_dims: int, output_dims: int, group):
        super().__init__(input_dims, output_dims, False, group)

    def __call__(self, x):
        return gather_last_axis(self._matmul(x), self.group)

    def to_quantized(self, group_size=64, bits=4, mode="affine"):
        out_dims, in_dims = self.weight.shape
        return VocabParallelQuantizedLinear(in_dims, out_dims, self.group, group_size, bits, mode)


class VocabParallelQuantizedLinear(VocabParallelLinear):
    _matmul = RowParallelQuantizedLinear._matmul

    def __init__(self, input_dims, output_dims, group, group_size=64, bits=4, mode="affine"):
        nn.Module.__init__(self)
        for k, v in QuantizedLinear(input_dims, output_dims, False, group_size, bits, mode).items():
            setattr(self, k, v)
        self.group_size, self.bits, self.mode, self.group = group_size, bits, mode, group
        self.freeze()

    def to_quantized(self, *a, **k):
        return self


class VocabParallelEmbedding(nn.Module):
    """A replicated embedding table whose tied output head uses only this rank's rows."""

    def __init__(self, num_embeddings: int, dims: int, group):
        super().__init__()
        self.weight = mx.zeros((num_embeddings, dims))
        self.group = group

    def _rows(self):
        n = self.weight.shape[0] // self.group.size()
        r = self.group.rank()
        return slice(r * n, (r + 1) * n)

    def __call__(self, ids):
        return self.weight[ids]

    def as_linear(self, x):
        return gather_last_axis(x @ self.weight[self._rows()].T, self.group)

    def to_quantized(self, group_size=64, bits=4, mode="affine"):
        n, d = self.weight.shape
        return VocabParallelQuantizedEmbedding(n, d, self.group, group_size, bits, mode)


class VocabParallelQuantizedEmbedding(QuantizedEmbedding):
    def __init__(self, num_embeddings, dims, group, group_size=64, bits=4, mode="affine"):
        super().__init__(num_embeddings, dims, group_size, bits, mode)
        self.group = group

    _rows = VocabParallelEmbedding._rows

    def as_linear(self, x):
        rows = self._rows()
        biases = self.biases[rows] if "biases" in self else None
        y = quantized_matmul(x, self.weight[rows], self.scales[rows], biases, self.group_size,
                             self.bits, self.mode)
        return gather_last_axis(y, self.group)


class ExpertParallelMoE(_moe.SparseMoE):
    """SparseMoE whose rank holds experts [first, first + n_local): routing is replicated, the
    rank's experts are weighted as usual and the others get weight 0, then one all_sum adds
    the ranks' partial outputs (and the row-split shared expert's)."""

    def __call__(self, x: mx.array) -> mx.array:
        inds, weights = self.route(x)
        local = inds.astype(mx.int32) - self.first_expert
        mine = (local >= 0) & (local < self.n_local)
        weights = mx.where(mine, weights, mx.zeros_like(weights))
        local = mx.where(mine, local, mx.zeros_like(local)).astype(mx.uint32)
        y = self.switch_mlp(x, local, weights)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return mx.distributed.all_sum(y, group=self.group)


# ---------------------------------------------------------------- splitting the modules

def _column(m, size: int):
    out_dims, q = m.weight.shape[0], _quant(m)
    if q:
        return QuantizedLinear(_in_dims(m), out_dims // size, "bias" in m, **q)
    return Linear(_in_dims(m), out_dims // size, bias="bias" in m)


def _row(m, group, reduce=True):
    new = RowParallelLinear(_in_dims(m) // group.size(), m.weight.shape[0], "bias" in m, group,
                            reduce)
    q = _quant(m)
    return new.to_quantized(**q) if q else new


def _per_head(m, heads: int):
    from .models.glm4_moe_lite import PerHeadLinear, QuantizedPerHeadLinear

    out_dims, q = m.weight.shape[1], _quant(m)
    if q:
        return QuantizedPerHeadLinear(_in_dims(m), out_dims, heads, **q)
    return PerHeadLinear(_in_dims(m), out_dims, heads)


def _switch(m, experts: int):
    out_dims, q = m.weight.shape[1], _quant(m)
    if q:
        return _moe.QuantizedSwitchLinear(_in_dims(m), out_dims, experts, **q)
    return _moe.SwitchLinear(_in_dims(m), out_dims, experts)


def _divides(count: int, size: int, what: str, where: str) -> int:
    if count % size:
        raise MarlinError(f"{where}: {count} {what} do not split across {size} ranks "
                          f"(tensor parallelism needs a multiple of {size})")
    return count // size


def _shard_mlp(mlp, group, where, reduce=True):
    size = group.size()
    _divides(mlp.gate_proj.weight.shape[0], size, "MLP hidden features", where)
    mlp.gate_proj = _column(mlp.gate_proj, size)
    mlp.up_proj = _column(mlp.up_proj, size)
    mlp.down_proj = _row(mlp.down_proj, group, reduce)


def _shard_moe(moe, group, where):
    size, rank = group.size(), group.rank()
    sw = moe.switch_mlp
    n_local = _divides(sw.gate_proj.weight.shape[0], size, "routed experts", where)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(sw, name, _switch(getattr(sw, name), n_local))
    if "shared_experts" in moe:
        _shard_mlp(moe.shared_experts, group, where + " shared expert", reduce=False)
    moe.__class__ = ExpertParallelMoE  # same parameters, the expert-parallel forward
    moe.first_expert, moe.n_local, moe.group = rank * n_local, n_local, group


def _shard_attention(attn, group, where):
    size = group.size()
    if hasattr(attn, "embed_q"):  # GLM's multi-head latent attention
        heads = _divides(attn.n_heads, size, "attention heads", where)
        attn.n_heads = heads
        if hasattr(attn, "q_b_proj"):
            attn.q_b_proj = _column(attn.q_b_proj, size)
        else:
            attn.q_proj = _column(attn.q_proj, size)
        attn.embed_q = _per_head(attn.embed_q, heads)
        attn.unembed_out = _per_head(attn.unembed_out, heads)
    elif hasattr(attn, "n_kv_heads"):
        heads = _divides(attn.n_heads, size, "attention heads", where)
        kv = _divides(attn.n_kv_heads, size, "key/value heads", where)
        attn.n_heads, attn.n_kv_heads = heads, kv
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, _column(getattr(attn, name), size))
    else:
        raise MarlinError(f"{where}: {type(attn).__name__} has no tensor-parallel split")
    attn.o_proj = _row(attn.o_proj, group)


def local_args(args, size: int):
    """The model's args as one rank sees them: heads and routed experts divided by `size`."""
    fields = {f.name for f in dataclasses.fields(args)}
    change = {k: getattr(args, k) // size for k in ("num_attention_heads", "num_key_value_heads",
                                                    "num_experts", "n_routed_experts")
              if k in fields and getattr(args, k)}
    return dataclasses.replace(args, **change)


def shard_modules(model, group) -> ShardPlan:
    """Replace the model's layers, in place, by this rank's parallel layers (weights not yet
    set: the caller loads the local slices). Quantized layers stay quantized alike. Errors
    clearly when heads, experts, MLP features or the vocabulary do not divide by the size."""
    size = group.size()
    name = getattr(model, "model_type", type(model).__name__)
    experts = 0
    for i, layer in enumerate(model.layers):
        where = f"{name} layer {i}"
        _shard_attention(layer.self_attn, group, where)
        mlp = layer.mlp
        if isinstance(mlp, _moe.SparseMoE):
            experts = mlp.switch_mlp.gate_proj.weight.shape[0]
            _shard_moe(mlp, group, where)
        elif isinstance(mlp, MLP):
            _shard_mlp(mlp, group, where)
        else:
            raise MarlinError(f"{where}: {type(mlp).__name__} has no tensor-parallel split")
    emb = model.model.embed_tokens
    vocab = emb.weight.shape[0]
    _divides(vocab, size, "vocabulary rows", f"{name} output head")
    if "lm_head" in model:
        head = model.lm_head
        new = VocabParallelLinear(_in_dims(head), vocab // size, group)
        q = _quant(head)
        model.lm_head = new.to_quantized(**q) if q else new
    else:
        q = _quant(emb)
        dims = emb.dims if q else emb.weight.shape[1]
        model.model.embed_tokens = (VocabParallelQuantizedEmbedding(vocab, dims, group, **q) if q
                                    else VocabParallelEmbedding(vocab, dims, group))
    model.args = local_args(model.args, size)
    model.tensor_parallel = (group.rank(), size)
    return ShardPlan(group, experts)


def shard_model(model, group):
    """Split a model already in memory across the group, in place: each rank keeps its slice
    of every tensor (copies; the full arrays are freed with the caller's last reference)."""
    from mlx.utils import tree_flatten

    if group.size() == 1:
        return model
    params = dict(tree_flatten(model.parameters()))
    plan = shard_modules(model, group)
    local = []
    for k, v in params.items():
        got = plan.local_name(k, v.shape)
        if got is not None:
            local.append((got[0], _take(v, got[1])))
    del params
    model.load_weights(local, strict=True)
    mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------- serving: rank 0 leads, the others follow

_STOP, _STEP, _RESET = 0, 1, 2
_HEADER = 8  # cmd, kind (0 prefill / 1 decode), B, L, table width, has prev_rows, prev B, unused


def _bcast(x: mx.array, group) -> mx.array:
    """Rank 0's x on every rank (the others pass an array of the same shape and dtype)."""
    return mx.distributed.all_sum(x if group.rank() == 0 else mx.zeros_like(x), group=group)


def _runner_classes():
    from .serving.paged_cache import KVPool, ModelRunner, StepInputs

    return KVPool, ModelRunner, StepInputs


def make_runner_class():
    """`DistributedRunner`: the serving engine's ModelRunner for rank 0 of a tensor-parallel
    group. Each `forward` first sends the step's inputs to the other ranks (two small
    all-reduces, started without waiting), the previous step's in-flight sampled tokens go
    along inside the graph (an all-reduce, no host sync), then runs rank 0's shard. Replacing
    `pool` (the engine's reset) resets the followers' pools too; `close()` releases them."""
    _, ModelRunner, _ = _runner_classes()

    class DistributedRunner(ModelRunner):
        def __init__(self, model, num_blocks: int, block_size: int, group):
            self.group, self._ready = group, False
            mx.eval(_bcast(mx.array([num_blocks, block_size], mx.int32), group))
            super().__init__(model, num_blocks, block_size)
            self._ready = True

        @property
        def pool(self):
            return self._pool

        @pool.setter
        def pool(self, value):
            if self._ready:
                self._send(np_header(_RESET))
            self._pool = value

        def _send(self, header, payload=None):
            # one eval each: within one eval two independent collectives may run in either
            # order, and every rank must see the header first
            mx.async_eval(_bcast(mx.array(header), self.group))
            if payload is not None:
                mx.async_eval(_bcast(mx.array(payload), self.group))

        def forward(self, inputs, prev_tokens=None):
            import numpy as np

            prev = inputs.prev_rows is not None
            B, L = inputs.token_ids.shape
            header = np_header(_STEP, int(inputs.kind == "decode"), B, L,
                               inputs.block_tables.shape[1], int(prev),
                               prev_tokens.shape[0] if prev else 0)
            parts = [inputs.token_ids, inputs.positions, inputs.block_tables,
                     inputs.slot_mapping, inputs.context_lens]
            if prev:
                parts.append(inputs.prev_rows)
            self._send(header, np.concatenate([np.asarray(p, np.int32).ravel() for p in parts]))
            if prev:
                prev_tokens = _bcast(prev_tokens.astype(mx.int32), self.group)
            logits = super().forward(inputs, prev_tokens)
            # start the step's collectives now, in this order, as the followers do: a later
            # step's inputs must not overtake them (the engine may defer evaluating a prefill)
            mx.async_eval(([logits] if logits is not None else []) + self.pool.arrays())
            return logits

        def close(self):
            """Tell the followers to return from `follow` (call once, after the engine stopped)."""
            mx.eval(_bcast(mx.array(np_header(_STOP)), self.group))

    return DistributedRunner


def runner_factory(group):
    """`factory(model, num_blocks, block_size)` building rank 0's DistributedRunner: what a
    serving engine that takes a runner factory needs for `serve --distributed`."""
    cls = make_runner_class()
    return lambda model, num_blocks, block_size: cls(model, num_blocks, block_size, group)


def np_header(cmd: int, *fields) -> list:
    return [cmd, *fields] + [0] * (_HEADER - 1 - len(fields))


def follow(model, group) -> int:
    """The loop of ranks > 0 while rank 0 serves: receive each step's inputs, run the same
    forward on this rank's shard and pools, evaluate what rank 0 evaluates (logits of decode
    steps, the pools). Returns the number of steps run when rank 0 closes its runner."""
    import numpy as np

    KVPool, ModelRunner, StepInputs = _runner_classes()
    num_blocks, block_size = _bcast(mx.zeros((2,), mx.int32), group).tolist()
    runner = ModelRunner(model, num_blocks, block_size)
    steps = 0
    while True:
        cmd, kind, B, L, width, has_prev, prev_b, _ = _bcast(
            mx.zeros((_HEADER,), mx.int32), group).tolist()
        if cmd == _STOP:
            return steps
        if cmd == _RESET:
            runner.pool = None  # free the old pool before allocating the new one
            runner.pool = KVPool(runner.spec, num_blocks, block_size)
            continue
        sizes = [B * L, B, B * width, B * L, B] + ([B] if has_prev else [])
        flat = np.array(_bcast(mx.zeros((sum(sizes),), mx.int32), group))
        cut = np.split(flat, np.cumsum(sizes)[:-1])
        inputs = StepInputs(kind="decode" if kind else "prefill", token_ids=cut[0].reshape(B, L),
                            positions=cut[1], block_tables=cut[2].reshape(B, width),
                            slot_mapping=cut[3], context_lens=cut[4],
                            prev_rows=cut[5] if has_prev else None)
        prev = _bcast(mx.zeros((prev_b,), mx.int32), group) if has_prev else None
        logits = runner.forward(inputs, prev_tokens=prev)
        mx.eval(([logits] if logits is not None else []) + runner.pool.arrays())
        steps += 1
