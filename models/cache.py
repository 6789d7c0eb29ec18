"""Key/value caches for incremental decoding.

The cache is pre-allocated in steps of `step` tokens and written in place, so decoding does not
reallocate per token. Models call `update_and_fetch(keys, values)` with new entries shaped
(batch, kv_heads, new_tokens, head_dim) and get back everything cached so far.

At single-token decode on a GPU the attention reads the buffers directly through the
buffer kernel (`attend`, kernels/buffer_attention.py), where the
selection measured it no slower than MLX's SDPA: its length array lets the whole decode step
compile as one function (models/base.py CompiledDecoder, through `KVCacheTrace`), and on CUDA
the rope kernel then writes each token's k and v rows into the buffers itself.
"""

import os
import warnings
from typing import Optional

import mlx.core as mx

from marlin_mlx.kernels import buffer_attention as _buffers
from marlin_mlx.kernels.launch import backend

# How a KVCache attends at single-token decode: "auto" (the buffer kernel on a GPU where the
# selection keeps it), "buffers" (always; on the CPU its MLX reference), "sdpa" (MLX's SDPA
# over the filled rows, so the decode step compiles per layer boundary)
KV_DECODE_PATHS = ("auto", "buffers", "sdpa")
KV_DECODE = os.environ.get("MARLIN_MLX_KV_DECODE", "").strip() or "auto"
if KV_DECODE not in KV_DECODE_PATHS:
    warnings.warn(f"MARLIN_MLX_KV_DECODE={KV_DECODE!r} is not one of {', '.join(KV_DECODE_PATHS)}"
                  "; using 'auto'")
    KV_DECODE = "auto"
# "auto" attends through the buffer kernel up to this many cached tokens; past it MLX's SDPA
# (per-layer compiled step) reads long contexts faster on the H200: 54-61 against 91-122 µs a
# layer at 32k tokens, level at 2k (benchmarks/buffer_attention.py, KERNEL_NOTES session 16)
BUFFER_MAX_TOKENS = 8192
# whether a traced step's new rows are written by the kernel that computes them (CUDA) rather
# than by slice updates; MARLIN_MLX_CACHE_IN_PLACE=0 turns it off (also for MLACache)
IN_PLACE_ROWS = os.environ.get("MARLIN_MLX_CACHE_IN_PLACE", "1").strip() != "0"

_LENS: dict = {}  # (B, offset) -> context lengths of an eager step, shared by the layers
_CAPS: dict = {}  # capacity -> int32 [capacity], the in-place write's row stride


class KVCache:
    # how this cache attends at decode (see KV_DECODE); None: KV_DECODE
    decode_attention: Optional[str] = None

    def __init__(self, step: int = 256):
        self.step = step
        self.keys = None
        self.values = None
        self.offset = 0
        # whether a compiled step may write rows in place: not after a trim, since a `state`
        # taken before it may share rows that later steps rewrite (a newly allocated buffer
        # is exclusive again)
        self.rows_in_place = True
        # set by `attend`: how the last single-token step attended through the buffers
        # ("kernel" / "reference", see _buffer_path) or None (SDPA); not None lets the whole
        # step be traced over this cache
        self.attends_buffers: Optional[str] = None

    def _reserve(self, n: int, B: int, H: int, Dk: int, Dv: int, dtype) -> None:
        """Room for `n` more rows: the buffers grow by whole steps."""
        prev = self.offset
        if self.keys is None or prev + n > self.keys.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, Dk), dtype)
            new_v = mx.zeros((B, H, grow, Dv), dtype)
            self.rows_in_place = True
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                # drop any tail beyond offset (left by a trim) before growing
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev = self.offset
        n = keys.shape[2]
        B, H, _, Dk = keys.shape
        self._reserve(n, B, H, Dk, values.shape[3], keys.dtype)
        self.offset = end = prev + n
        # (B, H, L, D): plain slices on the first three axes index faster than `...` (host
        # time paid per layer and token)
        self.keys[:, :, prev:end] = keys
        self.values[:, :, prev:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _buffer_path(self, q: mx.array) -> Optional[str]:
        """How a single-token step attends through the buffers: "kernel", "reference" (the
        kernel's MLX reference: forced on a backend without it) or None (MLX's SDPA)."""
        how = self.decode_attention or KV_DECODE
        if how not in KV_DECODE_PATHS:
            raise ValueError(f"KVCache.decode_attention {how!r} is not one of "
                             f"{', '.join(KV_DECODE_PATHS)}")
        if how == "sdpa":
            return None
        heads = (q.dtype, q.shape[1], self.keys.shape[1], self.keys.shape[3],
                 self.values.shape[3])
        if how == "buffers":
            return "kernel" if _buffers.supported(*heads) else "reference"
        if self.offset > BUFFER_MAX_TOKENS:
            return None
        return "kernel" if _buffers.use_kernel(*heads) else None

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, window=None):
        """Single-token attention (q: (B, H, 1, D)) over the buffers' first `offset` rows, or
        None (models/base.py `attention` then runs MLX's SDPA on k and v)."""
        if q.shape[2] != 1:
            return None
        path = None
        if window is None and self.keys is not None and q.dtype == self.keys.dtype:
            path = self._buffer_path(q)
        self.attends_buffers = path
        if path is None:
            return None
        B = q.shape[0]
        lens = _LENS.get((B, self.offset))
        if lens is None:
            if len(_LENS) > 64:
                _LENS.clear()
            lens = _LENS[(B, self.offset)] = mx.full((B,), self.offset, mx.int32)
        out = _buffers.buffer_attention(q[:, :, 0, :], self.keys, self.values, lens, scale,
                                      path == "kernel")
        return out[:, :, None, :]

    # The compiled whole decode step (models/base.py CompiledDecoder) takes the buffers as
    # inputs and returns the written ones: see KVCacheTrace.
    @property
    def traced_decode(self) -> bool:
        """Whether a compiled whole step may run over this cache: its last single-token step
        attended through the buffers (whose length array serves every position), and so will
        the next one."""
        if self.keys is None or self.attends_buffers is None:
            return False
        how = self.decode_attention or KV_DECODE
        return how != "auto" or self.offset + 1 <= BUFFER_MAX_TOKENS

    def trace_key(self) -> tuple:
        return ("kv", self.step, self.attends_buffers == "kernel", self.rows_in_place)

    def trace_inputs(self) -> list:
        """Room for one more token (grown here, outside the trace), then what a step takes:
        the buffers and their capacity (the in-place write's row stride)."""
        B, H, _, Dk = self.keys.shape
        self._reserve(1, B, H, Dk, self.values.shape[3], self.keys.dtype)
        cap = self.keys.shape[2]
        arr = _CAPS.get(cap)
        if arr is None:
            if len(_CAPS) > 256:
                _CAPS.clear()
            arr = _CAPS[cap] = mx.array([cap], dtype=mx.int32)
            mx.eval(arr)
        return [self.keys, self.values, arr]

    @staticmethod
    def traced(arrays: list, offset: mx.array, lens: mx.array, key: tuple) -> "KVCacheTrace":
        """The stand-in the layers write and attend through inside the trace."""
        return KVCacheTrace(arrays, offset, lens, key)

    def trace_commit(self, arrays: list) -> None:
        """Take the step's written buffers: one token appended."""
        self.keys, self.values = arrays
        self.offset += 1

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (speculative decoding, prompt-cache reuse)."""
        n = min(self.offset, n)
        self.offset -= n
        self.rows_in_place = self.rows_in_place and n == 0
        return n

    @property
    def state(self):
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class KVCacheTrace:
    """A KVCache inside a compiled whole decode step: the buffers are traced inputs and the new
    token's position an array, so the write is a dynamic slice update (or, on CUDA, the rope
    kernel's in-place write: `row_targets`) and the attention masks by length."""

    def __init__(self, arrays: list, offset: mx.array, lens: mx.array, key: tuple):
        self.keys, self.values, self.cap = arrays
        self.offset, self.lens = offset, lens
        _, _, self.kernel, self.rows_in_place = key

    def row_targets(self) -> Optional[tuple]:
        """(keys, values, capacity) the rope kernel may write this step's rows into, in place
        (kernels/qk_rope.py SPEC_CACHE), or None. On CUDA, where the GPU tests check it: nothing
        else writes the buffers in the step, and the attention after it takes that kernel's q,
        so it reads the rows after the write."""
        if IN_PLACE_ROWS and self.rows_in_place and backend() == "cuda":
            return self.keys, self.values, self.cap
        return None

    def update_and_fetch(self, keys: Optional[mx.array], values: Optional[mx.array]):
        if keys is None:  # the rope kernel wrote the rows in place (row_targets)
            return self.keys, self.values
        if keys.shape[2] != 1:
            raise ValueError("a traced decode step appends one row per sequence")
        at = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, keys.astype(self.keys.dtype), at, axes=(2,))
        self.values = mx.slice_update(self.values, values.astype(self.values.dtype), at, axes=(2,))
        return self.keys, self.values

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, window=None):
        if q.shape[2] != 1 or window is not None:
            raise ValueError("a traced decode step attends one query per sequence, no window")
        out = _buffers.buffer_attention(q[:, :, 0, :], self.keys, self.values, self.lens, scale,
                                      self.kernel)
        return out[:, :, None, :]

    def outputs(self) -> list:
        return [self.keys, self.values]
