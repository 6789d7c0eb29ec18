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

_INDEX: dict = {}  # (B, blocks, offset) -> (block tables, context lengths), shared by layers
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
        prev, n = self.offset, entries.shape[2]
        if self.buffer is None or prev + n > self.buffer.shape[2]:
            B, _, _, D = entries.shape
            grow = ((n + self.step - 1) // self.step) * self.step
            new = mx.zeros((B, 1, grow, D), entries.dtype)
            if self.buffer is None:
                self.buffer = new
            else:
                # a trim may have left a tail past offset: drop it before growing
                self.buffer = mx.concatenate([self.buffer[..., :prev, :], new], axis=2)
        self.kv_lora_rank = rank
        self.offset += n
        self.buffer[..., prev : self.offset, :] = entries
        return self.buffer[..., : self.offset, :]

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, window=None):
        """Absorbed decode attention (q: (B, H, 1, rank + rope)) over the whole buffer, or None
        (models/base.py `attention` then runs MLX's SDPA on k and v)."""
        how = self.decode_attention
        if how is None:
            how = DECODE_ATTENTION_GPU if backend() is not None else "sdpa"
        if (how == "sdpa" or q.shape[2] != 1 or window is not None or self.buffer is None
                or q.shape[-1] != self.buffer.shape[-1] or q.dtype != self.buffer.dtype):
            return None
        if how == "matmul":
            return self._attend_matmul(q, scale)
        if how != "paged":
            raise ValueError(f"MLACache.decode_attention {how!r} is not one of "
                             f"{', '.join(DECODE_ATTENTION_PATHS)}")
        B, _, cap, D = self.buffer.shape
        nb = cap // self.step
        key = (B, nb, self.offset)
        index = _INDEX.get(key)
        if index is None:
            if len(_INDEX) > 64:
                _INDEX.clear()
            tables = mx.arange(B * nb, dtype=mx.int32).reshape(B, nb)
            index = _INDEX[key] = (tables, mx.full((B,), self.offset, mx.int32))
        blocks = self.buffer.reshape(B * nb, 1, self.step, D)  # a view: no copy
        out = _paged.paged_attention(q[:, :, 0, :], blocks, None, *index, scale,
                                     v_dim=self.kv_lora_rank, validate=False)
        return out[:, :, None, :]

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
