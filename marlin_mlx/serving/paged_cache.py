"""The paged KV cache and the one place where the serving engine runs the model.

Storage: per layer a pool of fixed-size blocks, `keys[layer]` (num_blocks, kv_heads, block_size,
k_dim) and `values[layer]` (num_blocks, kv_heads, block_size, v_dim), or `values[layer] = None`
for GLM's latent attention (MLA), whose keys are the rows (latent | rope key) and whose values are
their first `kv_lora_rank` columns. Token position p of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

The boundary: `ModelRunner.forward(StepInputs)`. A `StepInputs` holds only plain integer numpy
arrays (token ids, positions, block tables, slot mapping, context lengths) and the kind of step;
everything a model forward needs beyond the weights and the pools is in it, so a distributed
engine can broadcast exactly these from rank 0 and run the same forward on every rank.

How a model uses the pools: the engine passes one `PagedKVCache` / `PagedLatentCache` per layer
as the model's `cache`. Its `offset` is an array of per-sequence start positions (RoPE takes an
array offset), `update_and_fetch` writes the new entries into the pool and
- in a prefill step (chunks of S sequences as right-padded rows, inputs (S, L)) returns each
  row's context gathered from its blocks, (S, heads, C, dim) with C the block tables' width in
  tokens; the model then calls `attend(q, k, v, scale, window)` (models/base.py `attention`
  does when a cache has it), which attends over those keys with each row's causal mask (query
  i of row r sees key j when j <= positions[r] + i): one forward prefills several sequences;
- in a decode step (B sequences of different lengths, inputs (B, 1)) returns the inputs, and
  `attend` computes paged attention over the pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import numpy as np

from ..generation import decode_forward
from .scheduler import MIN_PREFILL_ROW

try:  # the paged-attention op family (kernels/paged_attention.py); plain MLX below until it lands
    from marlin_mlx.kernels import paged_attention as _ops
except ImportError:  # pragma: no cover - depends on the tree's state
    _ops = None

PREFILL, DECODE = "prefill", "decode"


@dataclass
class StepInputs:
    """One model forward, as plain int32 numpy arrays.

    kind: "prefill" (B rows of up to L new tokens, one chunk of a sequence per row) or
      "decode" (B sequences, L == 1).
    token_ids: (B, L) the new tokens. A prefill row's chunk is its first
      context_lens - positions tokens; the rest of the row is padding, as are whole rows past the
      sequences (padding tokens get slots in a scratch block and are never attended by a real
      token, since they come after it).
    positions: (B,) position of each row's first new token (= tokens already cached).
    block_tables: (B, max_blocks) each row's blocks in order, padded with any valid block (never
      read by a real token: masked). A prefill attends over max_blocks * block_size keys, so the
      width sets the attention's shape (the engine rounds it up to reuse shapes).
    slot_mapping: (B * L,) pool slot of each new token, row-major.
    context_lens: (B,) tokens cached for each row after this step (positions + its new tokens).
    prev_rows: None, or (B,) for a decode step pipelined behind the previous one: row i's token
      is row prev_rows[i] of the previous decode step's sampled tokens (not read back yet);
      -1 takes token_ids[i]. (A distributed engine that broadcasts token ids reads the previous
      tokens back first and leaves this None.)
    """

    kind: str
    token_ids: np.ndarray
    positions: np.ndarray
    block_tables: np.ndarray
    slot_mapping: np.ndarray
    context_lens: np.ndarray
    prev_rows: Optional[np.ndarray] = None


PREFILL_CONTEXT_BUCKET = 256  # a bucketed prefill attends over a multiple of this many tokens
# keys gathered by one prefill forward, rows x context (per layer: this many tokens' keys and
# values, transient): short chunks after long cached prefixes go to several forwards
PREFILL_GATHER_TOKENS = 1 << 16


def prefill_groups(rows, max_gathered: Optional[int] = None) -> list:
    """`rows` (as pack_prefill takes them) in order, split into forwards whose row count times
    longest context stays within `max_gathered` (default PREFILL_GATHER_TOKENS; a row alone may
    exceed it)."""
    max_gathered = PREFILL_GATHER_TOKENS if max_gathered is None else max_gathered
    groups, ctx = [], 0
    for row in rows:
        c = max(ctx, row[1] + row[2])
        if groups and (len(groups[-1]) + 1) * c <= max_gathered:
            groups[-1].append(row)
            ctx = c
        else:
            groups.append([row])
            ctx = row[1] + row[2]
    return groups


def pack_prefill(rows, block_size: int, scratch_block: int,
                 bucket_budget: Optional[int] = None) -> StepInputs:
    """One prefill forward for chunks of several sequences, a right-padded row each.

    rows: (tokens, start, n, block_table) per sequence: its tokens[start : start + n] are
    computed, with tokens [0, start) already cached. Padding tokens (and padding rows) write
    into `scratch_block` and attend only to it.

    With `bucket_budget` (the engine's prefill chunk, on a GPU) the shapes come from a few
    buckets, so kernels and attention plans are reused instead of built for each new prompt
    length: the row length and the row count go up to powers of two (their product within the
    budget; rows at least MIN_PREFILL_ROW long), and the attended context up to a multiple of
    PREFILL_CONTEXT_BUCKET tokens."""
    bs = block_size
    S = len(rows)
    L = max(n for _, _, n, _ in rows)
    ctx = max(start + n for _, start, n, _ in rows)
    if bucket_budget is not None:
        L = min(max(1 << (L - 1).bit_length(), MIN_PREFILL_ROW), max(bucket_budget, L))
        S = min(1 << (S - 1).bit_length(), max(bucket_budget // L, S))
        ctx = -(-ctx // PREFILL_CONTEXT_BUCKET) * PREFILL_CONTEXT_BUCKET
    width = -(-ctx // bs)
    tokens = np.zeros((S, L), np.int32)
    positions = np.zeros(S, np.int32)
    lens = np.zeros(S, np.int32)
    tables = np.full((S, width), scratch_block, np.int32)
    slots = scratch_block * bs + np.arange(S * L, dtype=np.int32).reshape(S, L) % bs
    for r, (ids, start, n, table) in enumerate(rows):
        tokens[r, :n] = ids[start : start + n]
        positions[r], lens[r] = start, start + n
        table = np.asarray(table[:width], np.int32)
        tables[r, : len(table)] = table
        pos = np.arange(start, start + n)
        slots[r, :n] = table[pos // bs] * bs + pos % bs
    return StepInputs(kind=PREFILL, token_ids=tokens, positions=positions, block_tables=tables,
                      slot_mapping=slots.reshape(-1), context_lens=lens)


# --- plain-MLX paged ops (the reference semantics of kernels/paged_attention.py) ---

def write_paged_ref(cache: mx.array, entries: mx.array, slot_mapping: mx.array) -> mx.array:
    """cache (num_blocks, kv_heads, block_size, dim) with entries (T, kv_heads, dim) at slots."""
    bs, heads = cache.shape[2], cache.shape[1]
    blocks = (slot_mapping // bs)[:, None]
    pos = (slot_mapping % bs)[:, None]
    cache[blocks, mx.arange(heads)[None, :], pos] = entries.astype(cache.dtype)
    return cache


def gather_paged_ref(cache: mx.array, block_table: mx.array, length: int) -> mx.array:
    """(S, kv_heads, length, dim): the first `length` tokens of the sequences with block tables
    (S, max_blocks); a single table (max_blocks,) gives S = 1."""
    _, heads, bs, dim = cache.shape
    tables = block_table if block_table.ndim == 2 else block_table[None]
    n = -(-length // bs)
    blocks = cache[tables[:, :n]]  # (S, n, heads, bs, dim)
    S = tables.shape[0]
    return blocks.transpose(0, 2, 1, 3, 4).reshape(S, heads, n * bs, dim)[:, :, :length]


def paged_attention_ref(queries, key_cache, value_cache, block_tables, context_lens, scale, *,
                        v_dim=None, window=None):
    """queries (B, H, k_dim) -> (B, H, v_dim): one query per sequence over its cached tokens.

    `value_cache=None`: values are the first `v_dim` columns of the keys (MLA's latent rows).
    `window`: only the last `window` tokens of each sequence are attended (sliding window).
    """
    B, M = block_tables.shape
    _, heads, bs, k_dim = key_cache.shape
    S = M * bs

    def rows(cache):
        g = cache[block_tables]  # (B, M, heads, bs, dim)
        return g.transpose(0, 2, 1, 3, 4).reshape(B, heads, S, cache.shape[-1])

    k = rows(key_cache)
    v = k[..., :v_dim] if value_cache is None else rows(value_cache)
    pos = mx.arange(S)[None, :]
    lens = context_lens[:, None]
    mask = pos < lens
    if window is not None:
        mask = mask & (pos >= lens - window)
    out = mx.fast.scaled_dot_product_attention(queries[:, :, None, :], k, v, scale=scale,
                                               mask=mask[:, None, None, :])
    return out[:, :, 0, :]


def _write(cache, entries, slots):
    return (_ops.write_paged if _ops is not None else write_paged_ref)(cache, entries, slots)


def _gather(cache, table, length):
    return (_ops.gather_paged if _ops is not None else gather_paged_ref)(cache, table, length)


def _paged_attention(q, kc, vc, tables, lens, scale, v_dim, window):
    if _ops is not None and window is None:
        return _ops.paged_attention(q, kc, vc, tables, lens, scale, v_dim=v_dim)
    return paged_attention_ref(q, kc, vc, tables, lens, scale, v_dim=v_dim, window=window)


# --- pools and the per-layer cache views a model sees ---

@dataclass
class CacheSpec:
    """What one layer stores per token: `kv_heads` rows of `k_dim` keys and `v_dim` values, or
    (latent) one row of `k_dim` = kv_lora_rank + rope_dim whose first `v_dim` columns are values."""

    num_layers: int
    kv_heads: int
    k_dim: int
    v_dim: int
    latent: bool
    dtype: mx.Dtype

    def bytes_per_block(self, block_size: int) -> int:
        per_token = self.kv_heads * (self.k_dim + (0 if self.latent else self.v_dim))
        return self.num_layers * block_size * per_token * self.dtype.size


def cache_spec(model) -> CacheSpec:
    """Read the per-layer cache shape from the model's attention modules."""
    attn = model.layers[0].self_attn
    dtype = _compute_dtype(model)
    if hasattr(attn, "rank") and hasattr(attn, "rope_dim"):  # MLA (glm4_moe_lite)
        return CacheSpec(len(model.layers), 1, attn.rank + attn.rope_dim, attn.rank, True, dtype)
    return CacheSpec(len(model.layers), attn.n_kv_heads, attn.head_dim, attn.head_dim, False, dtype)


def _compute_dtype(model) -> mx.Dtype:
    # a norm weight is never quantized, so its dtype is the compute dtype
    w = model.layers[0].input_layernorm.weight
    return w.dtype


class KVPool:
    """The block pools of every layer (created zeroed; blocks are handed out by BlockManager)."""

    def __init__(self, spec: CacheSpec, num_blocks: int, block_size: int):
        self.spec, self.num_blocks, self.block_size = spec, num_blocks, block_size
        shape_k = (num_blocks, spec.kv_heads, block_size, spec.k_dim)
        shape_v = (num_blocks, spec.kv_heads, block_size, spec.v_dim)
        self.keys: List[mx.array] = [mx.zeros(shape_k, spec.dtype) for _ in range(spec.num_layers)]
        self.values: List[Optional[mx.array]] = [
            None if spec.latent else mx.zeros(shape_v, spec.dtype) for _ in range(spec.num_layers)
        ]
        mx.eval(self.keys, [v for v in self.values if v is not None])

    @property
    def nbytes(self) -> int:
        return self.spec.bytes_per_block(self.block_size) * self.num_blocks

    def arrays(self) -> list:
        return self.keys + [v for v in self.values if v is not None]


class _StepArrays:
    """The step's inputs as MLX arrays, shared by every layer's cache view."""

    def __init__(self, inputs: StepInputs):
        self.kind = inputs.kind
        self.positions = mx.array(inputs.positions, mx.int32)
        self.block_tables = mx.array(inputs.block_tables, mx.int32)
        self.slot_mapping = inputs.slot_mapping  # host copy: each pool builds its SlotIndex
        self._index: dict = {}
        self.context_lens = mx.array(inputs.context_lens, mx.int32)
        self.row_len = inputs.token_ids.shape[1]
        self._masks: dict = {}

    def prefill_mask(self, length: int, window: Optional[int], dtype: mx.Dtype) -> mx.array:
        """(B, 1, L, length) additive mask of a prefill step: 0 where query i of row r may see
        key j (j <= positions[r] + i, and within `window`), -inf elsewhere. Built once per step
        and shared by the layers; key j = 0 is always visible, so no row is all -inf."""
        key = (length, window, dtype)
        if key not in self._masks:
            qpos = self.positions[:, None] + mx.arange(self.row_len)[None, :]  # (B, L)
            kpos = mx.arange(length)[None, None, :]
            seen = kpos <= qpos[:, :, None]
            if window is not None:
                seen = seen & (kpos > qpos[:, :, None] - window)
            self._masks[key] = mx.where(seen, 0.0, -mx.inf).astype(dtype)[:, None]
        return self._masks[key]

    def slots(self, block_size: int, heads: int):
        """The step's write positions for a pool of this block size and heads (built once)."""
        key = (block_size, heads)
        if key not in self._index:
            self._index[key] = (_ops.SlotIndex(self.slot_mapping, block_size, heads)
                                if _ops is not None else mx.array(self.slot_mapping, mx.int32))
        return self._index[key]


class PagedKVCache:
    """Layer `layer` of a KVPool, seen by a model as its cache for one step (Llama/Qwen3 layout)."""

    def __init__(self, pool: KVPool, layer: int, step: _StepArrays):
        self.pool, self.layer, self.step = pool, layer, step
        self.offset = step.positions  # (B,) start positions: RoPE accepts an array offset

    def _store(self, which: list, new: mx.array) -> mx.array:
        B, heads, L, dim = new.shape
        flat = new.transpose(0, 2, 1, 3).reshape(B * L, heads, dim)
        slots = self.step.slots(self.pool.block_size, heads)
        which[self.layer] = _write(which[self.layer], flat, slots)
        if self.step.kind == PREFILL:
            tables = self.step.block_tables
            return _gather(which[self.layer], tables, tables.shape[1] * self.pool.block_size)
        return new

    @property
    def compiled_decode(self) -> bool:
        """A decode step may run through the model's compiled decoder (models/base.py)."""
        return self.step.kind == DECODE

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return self._store(self.pool.keys, keys), self._store(self.pool.values, values)

    def __getattr__(self, name):
        # models/base.py `attention` hands the attention to a cache that has `attend`
        if name == "attend":
            return self._attend if self.step.kind == DECODE else self._attend_prefill
        raise AttributeError(name)

    def _attend_prefill(self, q, k, v, scale, window=None):
        """The rows' queries over their gathered contexts k, v (B, kv_heads, C, dim)."""
        mask = self.step.prefill_mask(k.shape[2], window, q.dtype)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def _attend(self, q, k, v, scale, window=None):
        if q.shape[2] != 1:
            raise ValueError(f"a paged decode step takes one query per sequence, got {q.shape[2]}")
        out = _paged_attention(q[:, :, 0, :], self.pool.keys[self.layer],
                               self.pool.values[self.layer], self.step.block_tables,
                               self.step.context_lens, scale, v.shape[-1], window)
        return out[:, :, None, :]


class PagedLatentCache(PagedKVCache):
    """MLA's latent cache over a KVPool with `values = None` (GLM-4.7-Flash)."""

    def update_and_fetch(self, latent: mx.array, rope_keys: mx.array) -> mx.array:
        entries = mx.concatenate([latent, rope_keys.astype(latent.dtype)], axis=-1)
        return self.append(entries, latent.shape[-1])

    def append(self, entries: mx.array, kv_lora_rank: int) -> mx.array:
        """Rows (B, 1, L, rank + rope) already joined, as the compiled decode step hands them
        (models/mla_cache.py MLACache.append's contract)."""
        self.rank = kv_lora_rank
        return self._store(self.pool.keys, entries)

    def _attend(self, q, k, v, scale, window=None):
        dim = self.pool.keys[self.layer].shape[-1]
        if q.shape[-1] != dim:
            raise ValueError("a paged MLA decode step needs the absorbed attention form "
                             f"(query width {q.shape[-1]} != latent row width {dim})")
        if q.shape[2] != 1:
            raise ValueError(f"a paged decode step takes one query per sequence, got {q.shape[2]}")
        out = _paged_attention(q[:, :, 0, :], self.pool.keys[self.layer], None,
                               self.step.block_tables, self.step.context_lens, scale,
                               self.rank, window)
        return out[:, :, None, :]


class ModelRunner:
    """Every model invocation of the serving engine goes through `forward`.

    forward(StepInputs, prev_tokens=None) -> logits (B, vocab) float32 of each row's last new
    token for a decode step, None for a prefill step (its tokens only fill the cache: the engine
    always feeds a prompt's last token through a decode step). The pools are updated lazily;
    `pool.arrays()` must be evaluated with the step's results.
    """

    def __init__(self, model, num_blocks: int, block_size: int, compile: Optional[bool] = None):
        self.model = model
        # decode steps replay the model's compiled decoder (Llama, Qwen3, Qwen3-MoE, GLM):
        # the host builds a few compiled calls per layer instead of the whole graph
        self._decode = decode_forward(model, compile)
        self.spec = cache_spec(model)
        self.pool = KVPool(self.spec, num_blocks, block_size)
        self._cache_class = PagedLatentCache if self.spec.latent else PagedKVCache

    def forward(self, inputs: StepInputs,
                prev_tokens: Optional[mx.array] = None) -> Optional[mx.array]:
        step = _StepArrays(inputs)
        caches = [self._cache_class(self.pool, i, step) for i in range(self.spec.num_layers)]
        tokens = mx.array(inputs.token_ids, mx.int32)
        if inputs.prev_rows is not None:
            if prev_tokens is None:
                raise ValueError("prev_rows given without the previous step's tokens")
            rows = mx.array(np.maximum(inputs.prev_rows, 0), mx.int32)
            take = mx.array(inputs.prev_rows >= 0)[:, None]
            tokens = mx.where(take, prev_tokens[rows].astype(mx.int32)[:, None], tokens)
        if inputs.kind == PREFILL:
            self.model.model(tokens, caches)  # fills the pools; the head is not needed
            return None
        return self._decode(tokens, cache=caches)[:, -1, :].astype(mx.float32)
