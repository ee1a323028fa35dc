"""KV block bookkeeping: free pool, reference counts, block tables, automatic prefix caching.

Pure Python, no tensors: kv_cache.py holds the memory, this decides which sequence owns which
block (nano-vllm's block_manager and vLLM's paged KV are the models). A sequence holds blocks
only for the tokens it has: `allocate` at admission, `append` as it grows, `free` when it
finishes or is preempted.

Prefix caching: every full block gets a key chained over (the previous block's key, the block's
token ids), a 128-bit BLAKE2b digest so no tenant can forge a collision with another's prefix.
A new sequence whose leading blocks are already cached takes them with a reference instead of
computing them. A freed block keeps its contents and its key: it stays reusable until it is
evicted, least recently freed first (the tail of a chain before its head). Blocks without a key
are handed out before any cached one is evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zeroserve.workers.llm.sequence import Sequence

WATERMARK = 0.01  # share of blocks an admission must leave free while others run


def chain_key(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: its parent's key and its own token ids."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.watermark = max(1, int(num_blocks * WATERMARK))
        self.refs = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block holding those tokens' K/V
        self.empty = list(range(num_blocks - 1, -1, -1))  # free, no key (pop takes block 0)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free, keyed, LRU first
        self.hit_tokens = 0  # prompt tokens served from the cache
        self.queried_tokens = 0  # prompt tokens looked up

    # -- figures ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self.empty) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission -------------------------------------------------------------------------

    def _match(self, seq: Sequence) -> list[tuple[int, bytes]]:
        """Cached blocks that start this sequence (never its last token: it is computed)."""
        if not self.prefix_caching:
            return []
        hits: list[tuple[int, bytes]] = []
        for i in range((len(seq.token_ids) - 1) // self.block_size):
            key = self._key(seq, i)
            block = self.cached.get(key)
            if block is None:
                break
            hits.append((block, key))
        return hits

    def _key(self, seq: Sequence, i: int) -> bytes:
        """The key of the sequence's i-th full block, memoised on the sequence: tokens are
        only ever appended, so a key once computed stays right (across preemptions too)."""
        keys, bs = seq.block_keys, self.block_size
        while len(keys) <= i:
            j = len(keys)
            keys.append(chain_key(keys[-1] if keys else seq.cache_salt,
                                  seq.token_ids[j * bs:(j + 1) * bs]))
        return keys[i]

    def can_allocate(self, seq: Sequence, others_running: bool) -> bool:
        hits = self._match(seq)
        taken = sum(1 for b, _ in hits if self.refs[b] == 0)  # they leave the free pool
        need = self.blocks_for(len(seq.token_ids)) - len(hits) + taken
        reserve = self.watermark if others_running else 0
        return self.num_free - need >= reserve

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence its blocks: cached prefix first, fresh ones for the rest."""
        assert not seq.block_table, "allocate() on a sequence that holds blocks"
        hits = self._match(seq)
        for block, _ in hits:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
        seq.block_table = [b for b, _ in hits]
        seq.num_keyed_blocks = len(hits)
        seq.num_computed = len(hits) * self.block_size
        if seq.preemptions == 0:  # a first admission: count it for the hit rate
            self.queried_tokens += seq.prompt_len
            self.hit_tokens += seq.num_computed
            seq.num_cached_tokens = seq.num_computed
        self._grow(seq, len(seq.token_ids))

    # -- growth ----------------------------------------------------------------------------

    def can_append(self, seq: Sequence, num_new: int) -> bool:
        need = self.blocks_for(seq.num_computed + num_new) - len(seq.block_table)
        return need <= self.num_free

    def append(self, seq: Sequence, num_new: int) -> None:
        """Make room for the K/V of `num_new` more tokens of a running sequence."""
        self._grow(seq, seq.num_computed + num_new)

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        if self.empty:
            block = self.empty.pop()
        else:
            block, _ = self.evictable.popitem(last=False)
            key = self.key_of[block]
            if key is not None and self.cached.get(key) == block:
                del self.cached[key]
            self.key_of[block] = None
        self.refs[block] = 1
        return block

    def commit(self, seq: Sequence) -> None:
        """After a forward: key the blocks it filled, so later sequences can share them."""
        if not self.prefix_caching:
            return
        for i in range(seq.num_keyed_blocks, seq.num_computed // self.block_size):
            key, block = self._key(seq, i), seq.block_table[i]
            if key not in self.cached:  # else an equal block computed alongside stays keyless
                self.cached[key] = block
                self.key_of[block] = key
        seq.num_keyed_blocks = max(seq.num_keyed_blocks, seq.num_computed // self.block_size)

    # -- release ---------------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Drop a sequence's references; keyed blocks stay cached until evicted."""
        for block in reversed(seq.block_table):  # the tail is evicted before the head
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.key_of[block] is not None:
                    self.evictable[block] = None
                else:
                    self.empty.append(block)
        seq.block_table = []
        seq.num_keyed_blocks = 0

    # -- debug -----------------------------------------------------------------------------

    def check(self, holders: list[Sequence]) -> None:
        """Assert the accounting: every reference is a block-table entry, every block is in
        exactly one of (referenced, evictable, empty), and the cache points at keyed blocks."""
        refs = [0] * self.num_blocks
        for seq in holders:
            for block in seq.block_table:
                refs[block] += 1
        assert refs == self.refs, "reference counts differ from the block tables"
        empty, evictable = set(self.empty), set(self.evictable)
        assert len(empty) == len(self.empty) and not empty & evictable
        for block in range(self.num_blocks):
            held = refs[block] > 0
            assert held + (block in empty) + (block in evictable) == 1, f"block {block}"
            if block in empty:
                assert self.key_of[block] is None, f"empty block {block} has a key"
            if block in evictable:
                assert self.key_of[block] is not None, f"evictable block {block} has no key"
        for key, block in self.cached.items():
            assert self.key_of[block] == key, f"cache entry for block {block} is stale"
