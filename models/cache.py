"""Key/value caches for incremental decoding.

The cache is pre-allocated in steps of `step` tokens and written in place, so decoding does not
reallocate per token. Models call `update_and_fetch(keys, values)` with new entries shaped
(batch, kv_heads, new_tokens, head_dim) and get back everything cached so far.
"""

import mlx.core as mx


class KVCache:
    def __init__(self, step: int = 256):
        self.step = step
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev = self.offset
        n = keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            Dv = values.shape[3]
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, Dv), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                # drop any tail beyond offset (left by a trim) before growing
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset = end = prev + n
        # (B, H, L, D): plain slices on the first three axes index faster than `...` (host
        # time paid per layer and token)
        self.keys[:, :, prev:end] = keys
        self.values[:, :, prev:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (speculative decoding, prompt-cache reuse)."""
        n = min(self.offset, n)
        self.offset -= n
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
