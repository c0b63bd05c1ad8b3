"""The KV block pool: fixed-size blocks of the paged KV cache, allocated once at load.

Blocks are handed to sequences through block tables. With block reuse (prefix caching) every full
block is keyed by a hash chained with its parent block's, so two prompts with the same first N blocks
share them; a block nobody references stays cached until the LRU end of the free list reaches it.
With sliding-window attention a sequence gives back each block wholly before the window of its next
query; its table slot keeps the position and holds NO_BLOCK, which attention never reads.
"""

from __future__ import annotations

import array
import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence


# A block-table slot whose block went back to the pool (outside the sliding window). Negative, so that a
# kernel that read it anyway would fault rather than read another sequence's keys.
NO_BLOCK = -1


def max_live_blocks(num_tokens: int, block_size: int, sliding_window: int | None, max_chunk: int) -> int:
    """Most blocks a sequence of up to num_tokens tokens, computing at most max_chunk tokens a step, holds at
    once. Without a window, all of them. With one, a step holds the window of its first query and its own
    chunk, across block boundaries: window - 1 + chunk keys, plus one block for the alignment of the window's
    first block; one key more while a parent keeps its prompt's window for samples not forked yet."""
    blocks = -(-num_tokens // block_size)
    if sliding_window is None:
        return blocks
    return min(blocks, -(-(sliding_window + max_chunk) // block_size) + 1)


def block_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int, parent: bytes | None = None,
                 start_block: int = 0) -> list[bytes]:
    """Chained 128-bit hashes (BLAKE2b of the parent's hash and the block's token ids) of full blocks
    start_block .. num_blocks-1 of token_ids. A collision would silently reuse another prompt's KV, so
    not Python's 64-bit hash()."""
    hashes = []
    for b in range(start_block, num_blocks):
        block = array.array("q", token_ids[b * block_size:(b + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(block, digest_size=16, key=parent or b"").digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_reuse: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_reuse = enable_reuse
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))   # blocks holding nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.prefix_queries = 0  # tokens looked up by admitted sequences
        self.prefix_hits = 0     # of those, tokens found in cache

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free_blocks:
            raise RuntimeError(f"KV block pool exhausted: asked {n}, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def acquire(self, blocks: Sequence[int]) -> None:
        """Adds a reference to blocks already holding data (prefix hits, forked sequences)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                self._evictable.pop(block, None)
            self.ref_counts[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        # Last blocks first: the tail of a sequence is the least likely to be shared, so evict it first.
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} released twice"
            if self.ref_counts[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def match_prefix(self, token_ids: Sequence[int], hashes: list[bytes]) -> list[int]:
        """Cached blocks for the longest cached prefix (at least one token is left to compute), acquired.
        Lookups are not counted here: a sequence may be looked up again each iteration it waits."""
        if not self.enable_reuse:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        hits = []
        for h in hashes[:max_blocks]:
            block = self._by_hash.get(h)
            if block is None:
                break
            hits.append(block)
        self.acquire(hits)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Counts one admitted sequence's lookup in the hit rate."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def cache_block(self, block: int, block_hash: bytes) -> None:
        """Marks a full, computed block as reusable under its chained hash."""
        if self.enable_reuse and block_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash
