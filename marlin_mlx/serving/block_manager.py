"""Block bookkeeping for the paged KV cache: free list, reference counts, prefix cache.

A block is in exactly one of three states:
- free: no user, no cached content (in `free`, handed out first);
- in use: one or more sequences hold it (`ref[b] > 0`);
- cached: no user, but it holds a full block of known tokens registered under its prefix key,
  so a later request with the same prefix can take it over; it stays on an LRU list and is
  evicted (its key forgotten, the block reused) only when no free block is left.

A prefix key names a full block by its tokens and everything before them: key_i =
hash((key_{i-1}, tokens of block i)). The exact (parent key, tokens) pair is stored with each
cached block and compared on lookup, so a hash collision can never hand out wrong contents.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Dict, List, Optional, Sequence, Tuple

ROOT_KEY = 0  # the parent key of a sequence's first block


def block_key(parent: int, tokens: Sequence[int]) -> Tuple[int, tuple]:
    """(key, exact identity) of a full block with `tokens` after the prefix named `parent`."""
    ident = (parent, tuple(tokens))
    return hash(ident), ident


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.ref = [0] * num_blocks
        self.free: deque = deque(range(num_blocks))
        # cached blocks without users, least recently used first
        self.lru: "OrderedDict[int, None]" = OrderedDict()
        self.cached: Dict[int, int] = {}  # key -> block
        self.ident: Dict[int, tuple] = {}  # block -> (parent key, tokens) while it is cached
        self.key_of: Dict[int, int] = {}  # block -> key while it is cached

    # --- counts ---
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free ones plus evictable cached ones)."""
        return len(self.free) + len(self.lru)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    # --- allocation ---
    def allocate(self) -> Optional[int]:
        """A block with reference count 1, or None when every block is in use."""
        if self.free:
            b = self.free.popleft()
        elif self.lru:
            b, _ = self.lru.popitem(last=False)  # evict the least recently used cached block
            self._forget(b)
        else:
            return None
        self.ref[b] = 1
        return b

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unused blocks become cached (if keyed) or free."""
        for b in blocks:
            if self.ref[b] <= 0:
                raise RuntimeError(f"block {b} released more often than taken")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.key_of:
                    self.lru[b] = None  # most recently used at the end
                else:
                    self.free.append(b)

    def _forget(self, b: int) -> None:
        key = self.key_of.pop(b)
        self.ident.pop(b)
        if self.cached.get(key) == b:
            del self.cached[key]

    # --- prefix cache ---
    def match_prefix(self, tokens: Sequence[int], max_blocks: int) -> Tuple[List[int], List[int]]:
        """Take (reference) the cached blocks holding the longest run of full leading blocks of
        `tokens`, at most `max_blocks`. Returns (blocks, their keys)."""
        blocks, keys = [], []
        if not self.enable_prefix_cache:
            return blocks, keys
        parent, bs = ROOT_KEY, self.block_size
        for i in range(min(max_blocks, len(tokens) // bs)):
            key, ident = block_key(parent, tokens[i * bs : (i + 1) * bs])
            b = self.cached.get(key)
            if b is None or self.ident.get(b) != ident:
                break
            if self.ref[b] == 0:
                del self.lru[b]
            self.ref[b] += 1
            blocks.append(b)
            keys.append(key)
            parent = key
        return blocks, keys

    def register(self, block: int, parent: int, tokens: Sequence[int]) -> int:
        """Record that in-use `block` now holds the full block `tokens` after prefix `parent`.

        Returns its key (the parent of the next block). When another block already caches the
        same content, this one stays unkeyed and becomes free when released.
        """
        key, ident = block_key(parent, tokens)
        if not self.enable_prefix_cache or block in self.key_of:
            return key
        if key not in self.cached:
            self.cached[key] = block
            self.key_of[block] = key
            self.ident[block] = ident
        return key

    def check(self) -> None:
        """Invariants (tests): every block in exactly one state, counts consistent."""
        free, lru = set(self.free), set(self.lru)
        used = {b for b in range(self.num_blocks) if self.ref[b] > 0}
        assert len(free) == len(self.free), "a block is twice on the free list"
        assert not (free & lru) and not (free & used) and not (lru & used)
        assert free | lru | used == set(range(self.num_blocks)), "a block leaked"
        assert all(b in self.key_of for b in lru)
        assert all(self.cached[k] == b for b, k in self.key_of.items())
