"""One KV group's blocks: free pool, reference counts, prefix cache, and its sliding window.

Pure Python, no tensors. Layers that attend alike share a group (block_manager.py makes them):
a block id names the same slot in each of the group's layers. A group of full-attention layers
keeps every block of a sequence; a group with a sliding window of W tokens gives back the
leading blocks its window no longer sees (all positions below num_computed - W + 1, since the
next query sits at num_computed or later), and their table entries become block 0, the
group's null block (never handed out; masked out of attention by the window).

Prefix caching (nano-vllm's block_manager and vLLM's paged KV are the models): every full
block gets a key chained over (the previous block's key, the block's token ids), a 128-bit
BLAKE2b digest so no tenant can forge a collision with another's prefix. A freed block keeps
its contents and its key: it stays reusable until it is evicted, least recently freed first
(the tail of a chain before its head). Blocks without a key are handed out before any cached
one is evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zeroserve.workers.llm.sequence import Holding, Sequence

NULL = 0  # a windowed group's placeholder for blocks given back


def chain_key(parent: bytes, tokens: list[int]) -> bytes:
    """The prefix-cache key of a full block: its parent's key and its own token ids."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def block_key(seq: Sequence, i: int, block_size: int) -> bytes:
    """The key of the sequence's i-th full block, memoised on the sequence (every group keys
    alike): tokens are only ever appended, so a key once computed stays right."""
    keys = seq.block_keys
    while len(keys) <= i:
        j = len(keys)
        keys.append(chain_key(keys[-1] if keys else seq.cache_salt,
                              seq.token_ids[j * block_size:(j + 1) * block_size]))
    return keys[i]


class BlockPool:
    def __init__(self, index: int, num_blocks: int, block_size: int,
                 window: int | None = None) -> None:
        self.index = index  # which of a sequence's holdings is this group's
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.reserved = 1 if window else 0  # the null block
        self.refs = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> block holding those tokens' K/V
        self.empty = list(range(num_blocks - 1, self.reserved - 1, -1))  # free, no key
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free, keyed, LRU first
        self.max_held = 0  # the most blocks one sequence has held at once
        self.max_decode_held = 0  # the same, while decoding (no prompt chunk in flight)

    @property
    def num_free(self) -> int:
        return len(self.empty) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.reserved - self.num_free

    def first_needed(self, computed: int) -> int:
        """The first block a sequence with `computed` tokens still attends to."""
        if self.window is None:
            return 0
        return max(0, (computed - self.window + 1) // self.block_size)

    # -- prefix hits -----------------------------------------------------------------------

    def heights(self, seq: Sequence, limit: int) -> list[bool]:
        """ok[h] for h in 0..limit: could the sequence start with h cached blocks? A full group
        needs blocks 0..h-1 cached; a windowed group only those its window still sees."""
        ok = [True] + [False] * limit
        start = 0  # where the run of cached blocks ending at block i begins
        for i in range(limit):
            if self.cached.get(block_key(seq, i, self.block_size)) is None:
                if self.window is None:
                    break
                start = i + 1
                continue
            ok[i + 1] = start <= self.first_needed((i + 1) * self.block_size)
        return ok

    def need(self, seq: Sequence, height: int, upto: int) -> int:
        """Free blocks an admission with `height` cached blocks, grown to `upto` tokens, takes."""
        bs = self.block_size
        first = self.first_needed(height * bs)
        taken = sum(1 for i in range(first, height)
                    if self.refs[self.cached[block_key(seq, i, bs)]] == 0)
        return taken + max(0, -(-upto // bs) - max(height, first))

    def allocate(self, seq: Sequence, height: int, upto: int) -> None:
        hold = seq.kv[self.index]
        assert not hold.table, "allocate() on a sequence that holds blocks"
        bs = self.block_size
        first = self.first_needed(height * bs)
        hold.table = [NULL] * first
        for i in range(first, height):
            block = self.cached[block_key(seq, i, bs)]
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
            hold.table.append(block)
        hold.keyed = height
        hold.dropped = first
        self.grow(hold, upto)

    # -- growth and release ----------------------------------------------------------------

    def need_to_grow(self, hold: Holding, upto: int) -> int:
        return max(0, -(-upto // self.block_size) - len(hold.table))

    def grow(self, hold: Holding, upto: int, decoding: bool = False) -> None:
        """Blocks for every position below `upto` (past those given back)."""
        while len(hold.table) * self.block_size < upto:
            hold.table.append(self._take())
        held = len(hold.table) - hold.dropped
        self.max_held = max(self.max_held, held)
        if decoding:
            self.max_decode_held = max(self.max_decode_held, held)

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

    def commit(self, seq: Sequence, caching: bool) -> None:
        """After a forward: key the blocks it filled (so later sequences can share them), then
        give back what the window has passed."""
        hold, bs = seq.kv[self.index], self.block_size
        full = seq.num_computed // bs
        if caching:
            for i in range(max(hold.keyed, hold.dropped), full):
                key, block = block_key(seq, i, bs), hold.table[i]
                if key not in self.cached:  # else an equal block computed alongside stays keyless
                    self.cached[key] = block
                    self.key_of[block] = key
        hold.keyed = max(hold.keyed, full)
        first = self.first_needed(seq.num_computed)
        for i in range(hold.dropped, first):
            self._release(hold.table[i])
            hold.table[i] = NULL
        hold.dropped = max(hold.dropped, first)

    def free(self, hold: Holding) -> None:
        """Drop a sequence's references; keyed blocks stay cached until evicted."""
        for block in reversed(hold.table[hold.dropped:]):  # the tail is evicted before the head
            self._release(block)
        hold.table, hold.keyed, hold.dropped = [], 0, 0

    def _release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if self.key_of[block] is not None:
                self.evictable[block] = None
            else:
                self.empty.append(block)

    def check(self, holders: list[Sequence]) -> None:
        """Assert the accounting: every reference is a live table entry, every block is in
        exactly one of (referenced, evictable, empty), and the cache points at keyed blocks."""
        refs = [0] * self.num_blocks
        for seq in holders:
            hold = seq.kv[self.index]
            assert all(b == NULL for b in hold.table[:hold.dropped]), "a dropped block is held"
            for block in hold.table[hold.dropped:]:
                refs[block] += 1
        assert refs == self.refs, f"group {self.index}: reference counts differ from the tables"
        empty, evictable = set(self.empty), set(self.evictable)
        assert len(empty) == len(self.empty) and not empty & evictable
        for block in range(self.reserved, self.num_blocks):
            held = refs[block] > 0
            assert held + (block in empty) + (block in evictable) == 1, f"block {block}"
            if block in empty:
                assert self.key_of[block] is None, f"empty block {block} has a key"
            if block in evictable:
                assert self.key_of[block] is not None, f"evictable block {block} has no key"
        assert not self.reserved or refs[NULL] == 0 and NULL not in empty | evictable
        for key, block in self.cached.items():
            assert self.key_of[block] == key, f"cache entry for block {block} is stale"
