"""KV block bookkeeping across the model's KV groups: admission, growth, prefix hits, release.

Pure Python, no tensors: kv_cache.py holds the memory, this decides which sequence owns which
blocks. Layers are grouped by their sliding window (kv_cache.plan_groups): one pool per group
(block_pool.py), so a windowed group (Mistral's layers, Gemma's local ones) holds only the
blocks its window still sees while a full group keeps them all. A sequence has one block table
per group (Sequence.kv), all indexed by position.

A sequence holds blocks only for the tokens it has: `allocate` at admission (a full group takes
the whole prompt's blocks; a windowed one only the first chunk's), `append` as it grows,
`commit` after each forward (keys the blocks it filled, gives back what windows passed),
`free` when it finishes or is preempted. Admission and growth must fit every group.

A prefix hit is the longest run of leading blocks that every group can supply: a full group
its blocks 0..h-1, a windowed group those its window still sees from position h * block_size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zeroserve.workers.llm.block_pool import BlockPool, chain_key
from zeroserve.workers.llm.sequence import Holding

if TYPE_CHECKING:
    from zeroserve.workers.llm.sequence import Sequence

__all__ = ["BlockManager", "chain_key"]
WATERMARK = 0.01  # share of blocks an admission must leave free while others run
UNBOUNDED = 1 << 62


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True,
                 windows: list[int | None] | None = None,
                 sizes: list[int] | None = None, layers: list[int] | None = None) -> None:
        """One group per entry of `windows` (default: one full-attention group), each of
        `sizes[i]` blocks (default: `num_blocks`) in `layers[i]` layers (default: 1)."""
        windows = windows or [None]
        sizes = sizes or [num_blocks] * len(windows)
        self.layers = layers or [1] * len(windows)
        self.pools = [BlockPool(i, n, block_size, w)
                      for i, (w, n) in enumerate(zip(windows, sizes, strict=True))]
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.hit_tokens = 0  # prompt tokens served from the cache
        self.queried_tokens = 0  # prompt tokens looked up

    # -- figures ---------------------------------------------------------------------------

    @property
    def first(self) -> BlockPool:
        return self.pools[0]

    @property
    def refs(self) -> list[int]:  # the first group's (the only one of most models)
        return self.first.refs

    @property
    def cached(self) -> dict[bytes, int]:
        return self.first.cached

    @property
    def num_blocks(self) -> int:
        return sum(p.num_blocks - p.reserved for p in self.pools)

    @property
    def num_free(self) -> int:
        return sum(p.num_free for p in self.pools)

    @property
    def num_used(self) -> int:
        return sum(p.num_used for p in self.pools)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def fits(self, num_tokens: int, chunk: int) -> bool:
        """Could one sequence of `num_tokens`, prefilled `chunk` tokens a step, ever fit?"""
        for p in self.pools:
            span = num_tokens if p.window is None else min(num_tokens, p.window - 1 + chunk)
            if self.blocks_for(span) + (p.window is not None) > p.num_blocks - p.reserved:
                return False
        return True

    # -- admission -------------------------------------------------------------------------

    def _height(self, seq: Sequence) -> int:
        """Cached leading blocks every group can supply (never the last token: it is
        computed)."""
        limit = (len(seq.token_ids) - 1) // self.block_size if self.prefix_caching else 0
        ok = [True] * (limit + 1)
        for pool in self.pools:
            ok = [a and b for a, b in zip(ok, pool.heights(seq, limit), strict=True)]
        return max(h for h, good in enumerate(ok) if good)

    def _upto(self, pool: BlockPool, seq: Sequence, height: int, budget: int) -> int:
        """Tokens an admission gives blocks for: a full group the whole prompt (no preemption
        mid-prefill), a windowed group the first chunk."""
        n = len(seq.token_ids)
        return n if pool.window is None else min(n, height * self.block_size + budget)

    def can_allocate(self, seq: Sequence, others_running: bool,
                     budget: int = UNBOUNDED) -> bool:
        height = self._height(seq)
        for pool in self.pools:
            reserve = max(1, int(pool.num_blocks * WATERMARK)) if others_running else 0
            need = pool.need(seq, height, self._upto(pool, seq, height, budget))
            if pool.num_free - need < reserve:
                return False
        return True

    def allocate(self, seq: Sequence, budget: int = UNBOUNDED) -> None:
        """Give a waiting sequence its blocks: cached prefix first, fresh ones for the rest."""
        height = self._height(seq)
        seq.kv = [Holding() for _ in self.pools]
        for pool in self.pools:
            pool.allocate(seq, height, self._upto(pool, seq, height, budget))
        seq.num_computed = height * self.block_size
        if seq.preemptions == 0:  # a first admission: count it for the hit rate
            self.queried_tokens += seq.prompt_len
            self.hit_tokens += min(seq.num_computed, seq.prompt_len)
            # a resumed sequence's cached run may reach into its resumed output: only prompt
            # tokens count as cached prompt tokens
            seq.num_cached_tokens = min(seq.num_computed, seq.prompt_len)

    # -- growth ----------------------------------------------------------------------------

    def can_append(self, seq: Sequence, num_new: int) -> bool:
        upto = seq.num_computed + num_new
        return all(p.need_to_grow(seq.kv[p.index], upto) <= p.num_free for p in self.pools)

    def append(self, seq: Sequence, num_new: int) -> None:
        """Make room for the K/V of `num_new` more tokens of a running sequence."""
        for pool in self.pools:
            pool.grow(seq.kv[pool.index], seq.num_computed + num_new, decoding=num_new == 1)

    def commit(self, seq: Sequence) -> None:
        """After a forward: key the blocks it filled; windowed groups give back the rest."""
        for pool in self.pools:
            pool.commit(seq, self.prefix_caching)

    # -- release ---------------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        for pool in self.pools:
            if seq.kv:
                pool.free(seq.kv[pool.index])

    def reset_figures(self) -> None:
        self.hit_tokens = self.queried_tokens = 0
        for pool in self.pools:
            pool.max_held = pool.max_decode_held = 0

    def check(self, holders: list[Sequence]) -> None:
        for pool in self.pools:
            pool.check(holders)

    def tokens(self, used: bool) -> int:
        """KV memory in tokens of every layer (a windowed group's block counts for its share
        of the layers): in use, or in all."""
        total = sum(self.layers)
        return round(sum((p.num_used if used else p.num_blocks - p.reserved) * n / total
                         for p, n in zip(self.pools, self.layers, strict=True))
                     * self.block_size)

    def groups(self) -> list[dict[str, int | None]]:
        """Each group's figures, for stats: window, layers, blocks, used, and the most blocks
        one sequence has held at once (at all; while decoding)."""
        return [{"window": p.window, "layers": n, "blocks": p.num_blocks - p.reserved,
                 "used": p.num_used, "max_held": p.max_held,
                 "max_decode_held": p.max_decode_held}
                for p, n in zip(self.pools, self.layers, strict=True)]
