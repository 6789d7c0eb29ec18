"""Latent cache for multi-head latent attention (MLA: DeepSeek-V2/V3, GLM-4.7-Flash).

MLA attends over a per-token latent (kv_lora_rank values, after the kv_a layernorm) and one
rope key (qk_rope_head_dim values, already rotated) shared by all heads. Only those are
cached: per token and layer `kv_lora_rank + qk_rope_head_dim` values, instead of
heads * (qk_head_dim + v_head_dim) for the expanded keys and values.

Both parts live side by side in one buffer (B, 1, capacity, kv_lora_rank + rope_dim), so the
absorbed decode reads it directly as its key (latent | rope key) and the first
kv_lora_rank columns as its value, with no concatenation per step. The buffer grows in
steps of `step` tokens, like `KVCache`.

On a GPU the absorbed single-token step attends through the serving engine's paged-attention
kernel (kernels/paged_attention.py), reading this buffer in place as blocks of `step` tokens:
one split-K pass over the latent rows instead of MLX's SDPA, which does not cover 576-wide
heads and so runs as separate matmul and softmax ops over copies of the keys and values.
"""

import os
import warnings
from typing import Optional

import mlx.core as mx

from marlin_mlx.kernels import paged_attention as _paged
from marlin_mlx.kernels.launch import backend

from . import cache as _cache

_TABLES: dict = {}  # (B, blocks) -> block table of a buffer read in place, shared by layers
_LENS: dict = {}  # (B, offset) -> context lengths of an eager step, shared by layers
DECODE_ATTENTION_PATHS = ("paged", "matmul", "sdpa")
# the GPU default (benchmarks/mla_attention.py measures the three); MARLIN_MLX_MLA_DECODE overrides
DECODE_ATTENTION_GPU = os.environ.get("MARLIN_MLX_MLA_DECODE", "").strip() or "paged"
if DECODE_ATTENTION_GPU not in DECODE_ATTENTION_PATHS:
    warnings.warn(f"MARLIN_MLX_MLA_DECODE={DECODE_ATTENTION_GPU!r} is not one of "
                  f"{', '.join(DECODE_ATTENTION_PATHS)}; using 'paged'")
    DECODE_ATTENTION_GPU = "paged"




class MLACache:
    compiled_decode = True  # a decode step may run through base.CompiledDecoder
    # how a single-token (absorbed) step attends: "paged" (kernels/paged_attention.py over the
    # buffer), "matmul" (two MLX matmuls and a softmax over the buffer in place), "sdpa" (the
    # model's MLX SDPA); None: DECODE_ATTENTION_GPU on a GPU, "sdpa" elsewhere
    decode_attention: Optional[str] = None

    def __init__(self, step: int = 256):
        self.step = step
        self.buffer = None  # (B, 1, capacity, kv_lora_rank + rope_dim)
        self.kv_lora_rank = None
        # whether a compiled step may write rows into the buffer in place: not after a trim,
        # since a `state` taken before it may share the rows that later steps rewrite (a slice
        # update copies the buffer then); a newly allocated buffer is exclusive again
        self.rows_in_place = True
        self.offset = 0

    def update_and_fetch(self, latent: mx.array, rope_keys: mx.array) -> mx.array:
        """Append `latent` (B, 1, L, kv_lora_rank) and `rope_keys` (B, 1, L, rope_dim).

        Returns everything cached so far as one array (B, 1, offset, kv_lora_rank + rope_dim).
        """
        if latent.shape[:3] != rope_keys.shape[:3]:
            raise ValueError(
                f"latent {latent.shape} and rope keys {rope_keys.shape} disagree on (B, 1, L)"
            )
        return self.append(mx.concatenate([latent, rope_keys.astype(latent.dtype)], axis=-1),
                           latent.shape[-1])

    def append(self, entries: mx.array, kv_lora_rank: int) -> mx.array:
        """Append rows (B, 1, L, kv_lora_rank + rope_dim), each its latent then its rope key
        (the fused decode kernel writes them so); returns the cache as `update_and_fetch`."""
        rank = kv_lora_rank
        if self.kv_lora_rank is not None and rank != self.kv_lora_rank:
            raise ValueError(f"latent width {rank} != cached kv_lora_rank {self.kv_lora_rank}")
        B, _, n, D = entries.shape
        prev = self.offset
        self._reserve(n, B, D, entries.dtype)
        self.kv_lora_rank = rank
        self.offset += n
        self.buffer[..., prev : self.offset, :] = entries
        return self.buffer[..., : self.offset, :]

    def _reserve(self, n: int, B: int, D: int, dtype) -> None:
        """Room for `n` more rows: the buffer grows by whole steps."""
        prev = self.offset
        if self.buffer is None or prev + n > self.buffer.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            new = mx.zeros((B, 1, grow, D), dtype)
            self.rows_in_place = True
            if self.buffer is None:
                self.buffer = new
            else:
                # a trim may have left a tail past offset: drop it before growing
                self.buffer = mx.concatenate([self.buffer[..., :prev, :], new], axis=2)

    def _decode_path(self) -> str:
        how = self.decode_attention
        if how is None:
            how = DECODE_ATTENTION_GPU if backend() is not None else "sdpa"
        if how not in DECODE_ATTENTION_PATHS:
            raise ValueError(f"MLACache.decode_attention {how!r} is not one of "
                             f"{', '.join(DECODE_ATTENTION_PATHS)}")
        return how

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, window=None):
        """Absorbed decode attention (q: (B, H, 1, rank + rope)) over the whole buffer, or None
        (models/base.py `attention` then runs MLX's SDPA on k and v)."""
        how = self._decode_path()
        if (how == "sdpa" or q.shape[2] != 1 or window is not None or self.buffer is None
                or q.shape[-1] != self.buffer.shape[-1] or q.dtype != self.buffer.dtype):
            return None
        if how == "matmul":
            return self._attend_matmul(q, scale)
        B = self.buffer.shape[0]
        key = (B, self.offset)
        lens = _LENS.get(key)
        if lens is None:
            if len(_LENS) > 64:
                _LENS.clear()
            lens = _LENS[key] = mx.full((B,), self.offset, mx.int32)
        return _attend_paged(q, self.buffer, _block_table(B, self.buffer.shape[2] // self.step),
                             lens, self.step, scale, self.kv_lora_rank)

    # The compiled whole decode step (models/base.py CompiledDecoder) takes the buffer as an
    # input and returns the written one: see MLACacheTrace.
    @property
    def traced_decode(self) -> bool:
        """Whether a compiled whole step may run over this cache: its attention reads the buffer
        by length arrays (the paged path), so one trace serves every step until it grows."""
        return self.buffer is not None and self._decode_path() == "paged"

    def trace_key(self) -> tuple:
        return ("mla", self.step, self.kv_lora_rank, self.rows_in_place)

    def trace_inputs(self) -> list:
        """Room for one more token (grown here, outside the trace), then what a step takes:
        the buffer and its block table."""
        B, _, _, D = self.buffer.shape
        self._reserve(1, B, D, self.buffer.dtype)
        return [self.buffer, _block_table(B, self.buffer.shape[2] // self.step)]

    @staticmethod
    def traced(arrays: list, offset: mx.array, lens: mx.array, key: tuple) -> "MLACacheTrace":
        """The stand-in the layers write and attend through inside the trace."""
        return MLACacheTrace(arrays, offset, lens, key)

    def trace_commit(self, arrays: list) -> None:
        """Take the step's written buffer: one token appended."""
        self.buffer = arrays[0]
        self.offset += 1

    def _attend_matmul(self, q: mx.array, scale: float) -> mx.array:
        """q (B, H, 1, D) against the buffer's first `offset` rows, read in place: the keys are
        whole rows and the values their first kv_lora_rank columns (a row-strided view that
        a matmul takes without a copy)."""
        keys = self.buffer[:, 0, : self.offset, :]  # (B, T, D)
        values = keys[..., : self.kv_lora_rank]
        scores = (q[:, :, 0, :] * scale) @ keys.swapaxes(-1, -2)  # (B, H, T)
        probs = mx.softmax(scores, axis=-1, precise=True)
        return (probs @ values)[:, :, None, :]

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (speculative decoding, prompt-cache reuse)."""
        n = min(self.offset, n)
        self.offset -= n
        self.rows_in_place = self.rows_in_place and n == 0
        return n

    @property
    def state(self):
        """[latent (B, 1, T, kv_lora_rank), rope keys (B, 1, T, rope_dim)] for the cached T tokens."""
        if self.buffer is None:
            return []
        filled = self.buffer[..., : self.offset, :]
        return [filled[..., : self.kv_lora_rank], filled[..., self.kv_lora_rank :]]

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.nbytes


class MLACacheTrace:
    """An MLACache inside a compiled whole decode step (models/base.py CompiledDecoder): the
    buffer is a traced input, and the new token's position an array, so the write is a dynamic
    slice update (or, on CUDA, the query kernel's in-place write: `row_target`) and the
    attention masks by length."""

    compiled_decode = True

    def __init__(self, arrays: list, offset: mx.array, lens: mx.array, key: tuple):
        self.buffer, self.table = arrays
        self.offset, self.lens = offset, lens
        _, self.step, self.kv_lora_rank, self.rows_in_place = key

    def row_target(self) -> Optional[mx.array]:
        """The buffer the fused query kernel may write this step's row into, in place
        (kernels/mla_decode.py SPEC_Q_CACHE), or None: on CUDA (where the GPU tests check it),
        one sequence. Nothing else writes the buffer in the step, and the attention after it
        takes that kernel's query, so it reads the row after the write."""
        if (_cache.IN_PLACE_ROWS and self.rows_in_place and backend() == "cuda"
                and self.buffer.shape[0] == 1):
            return self.buffer
        return None

    def append(self, entries: Optional[mx.array], kv_lora_rank: int) -> mx.array:
        if entries is None:  # the query kernel wrote the row in place (row_target)
            return self.buffer
        if entries.shape[2] != 1 or kv_lora_rank != self.kv_lora_rank:
            raise ValueError("a traced MLA step appends one row of the cached latent width")
        self.buffer = mx.slice_update(self.buffer, entries.astype(self.buffer.dtype),
                                      self.offset.reshape(1), axes=(2,))
        return self.buffer

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, window=None):
        if q.shape[2] != 1 or window is not None:
            raise ValueError("a traced MLA step attends one query per sequence, no window")
        return _attend_paged(q, self.buffer, self.table, self.lens, self.step, scale,
                             self.kv_lora_rank)

    def outputs(self) -> list:
        return [self.buffer]


def _block_table(B: int, nb: int) -> mx.array:
    """The block table of B buffers of nb blocks each read in place: sequence b owns blocks
    b * nb ... b * nb + nb - 1 of the buffer viewed as (B * nb, 1, step, D)."""
    table = _TABLES.get((B, nb))
    if table is None:
        if len(_TABLES) > 64:
            _TABLES.clear()
        table = _TABLES[(B, nb)] = mx.arange(B * nb, dtype=mx.int32).reshape(B, nb)
        mx.eval(table)
    return table


def _attend_paged(q, buffer, table, lens, step, scale, rank):
    """q (B, H, 1, D) over the buffer's first lens[b] rows through the paged-attention op."""
    B, _, cap, D = buffer.shape
    blocks = buffer.reshape(B * (cap // step), 1, step, D)  # a view: no copy
    out = _paged.paged_attention(q[:, :, 0, :], blocks, None, table, lens, scale,
                                 v_dim=rank, validate=False)
    return out[:, :, None, :]
