"""KV block bookkeeping: blocks only for tokens held, prefix hits, LRU eviction, accounting."""

from __future__ import annotations

import pytest

from zeroserve.workers.llm.block_manager import BlockManager, chain_key
from zeroserve.workers.llm.params import SamplingParams
from zeroserve.workers.llm.sequence import Sequence


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence((b"t", name), list(tokens), SamplingParams(), None)  # type: ignore[arg-type]


def computed(bm: BlockManager, s: Sequence) -> None:
    """What a forward over every token does to the bookkeeping."""
    s.num_computed = len(s.token_ids)
    bm.commit(s)


def test_a_sequence_holds_blocks_only_for_its_tokens_and_grows_by_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(list(range(6)))
    assert bm.can_allocate(s, others_running=False)
    bm.allocate(s)
    assert len(s.block_table) == 2 and bm.num_used == 2  # 6 tokens: 2 blocks, not 10
    computed(bm, s)
    s.token_ids += [100, 101]  # two decodes fill block 2's space
    assert bm.can_append(s, 2)
    bm.append(s, 2)
    assert len(s.block_table) == 2
    s.num_computed = 8
    s.token_ids.append(102)
    bm.append(s, 1)
    assert len(s.block_table) == 3
    bm.check([s])
    bm.free(s)
    assert bm.num_used == 0 and bm.num_free == 10
    bm.check([])


def test_prefix_hits_share_blocks_and_never_cover_the_last_token() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(10)), "a")
    bm.allocate(a)
    computed(bm, a)
    assert len(bm.cached) == 2  # two full blocks keyed; the partial third is not
    b = seq(list(range(8)) + [50, 51, 52], "b")  # shares two full blocks
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_computed == 8
    assert bm.refs[a.block_table[0]] == 2
    c = seq(list(range(8)), "c")  # exactly two blocks: its last token must be computed
    bm.allocate(c)
    assert c.num_computed == 4 and c.block_table[0] == a.block_table[0]
    assert c.block_table[1] != a.block_table[1]
    d = seq([7] + list(range(1, 10)), "d")  # differs in the first token: no hit at all
    bm.allocate(d)
    assert d.num_computed == 0
    assert bm.hit_tokens == 8 + 4 and bm.queried_tokens == 10 + 11 + 8 + 10
    bm.check([a, b, c, d])
    for s in (a, b, c, d):
        bm.free(s)
    bm.check([])


def test_keys_chain_over_the_parent() -> None:
    block = [1, 2, 3, 4]
    assert chain_key(b"", block) == chain_key(b"", list(block))
    assert chain_key(chain_key(b"", [9, 9, 9, 9]), block) != chain_key(b"", block)
    assert len(chain_key(b"", block)) == 16


def test_freed_blocks_stay_cached_until_evicted_tail_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")  # 3 blocks, 2 of them full and keyed
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    assert bm.num_free == 4 and len(bm.cached) == 2
    again = seq([1, 2, 3, 4, 9], "again")
    bm.allocate(again)
    assert again.num_computed == 4  # both keyed blocks reused after the free
    bm.free(again)
    # two blocks without keys go first, then the tail of the chain, then its head
    hungry = seq(list(range(100, 106)), "hungry")
    bm.allocate(hungry)
    assert len(bm.cached) == 1 and chain_key(b"", [1, 2]) in bm.cached
    bm.check([hungry])


def test_admission_keeps_a_watermark_while_others_run() -> None:
    bm = BlockManager(num_blocks=100, block_size=1)
    s = seq(list(range(100)))
    assert bm.can_allocate(s, others_running=False)
    assert not bm.can_allocate(s, others_running=True)  # 1 block must stay free


def test_check_catches_a_leaked_reference() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    s = seq([1, 2, 3])
    bm.allocate(s)
    bm.refs[s.block_table[0]] += 1
    with pytest.raises(AssertionError, match="reference counts"):
        bm.check([s])


def test_without_prefix_caching_nothing_is_kept() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, prefix_caching=False)
    a = seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    b = seq([1, 2, 3, 4, 5])
    bm.allocate(b)
    assert b.num_computed == 0 and not bm.cached


def test_a_windowed_group_gives_back_what_its_window_passed_and_hits_without_it() -> None:
    bm = BlockManager(num_blocks=16, block_size=2, windows=[None, 3], sizes=[16, 8])
    full, windowed = bm.pools
    a = seq(list(range(12)), "a")
    bm.allocate(a)
    computed(bm, a)  # 12 tokens: the next query (position 12) sees positions 10 and 11 only
    assert len(a.kv[0].table) == 6 and full.num_used == 6
    assert a.kv[1].table[:5] == [0] * 5 and windowed.num_used == 1
    bm.check([a])
    bm.free(a)
    hungry = seq(list(range(100, 106)), "hungry")  # evicts the windowed group's blocks 0, 1
    bm.allocate(hungry)
    assert windowed.cached.get(chain_key(b"", [0, 1])) is None
    b = seq(list(range(12)) + [50], "b")
    bm.allocate(b)  # the full group has all six blocks, the window needs only the sixth
    assert b.num_computed == 12 and b.num_cached_tokens == 12
    assert b.kv[1].table[:5] == [0] * 5 and b.kv[1].table[5] != 0
    bm.check([hungry, b])


def test_a_resumed_sequence_never_reports_more_cached_than_prompt_tokens() -> None:
    bm = BlockManager(num_blocks=16, block_size=2)
    first = seq(list(range(12)), "first")
    bm.allocate(first)
    computed(bm, first)
    resumed = seq(list(range(12)) + [99], "resumed")
    resumed.prompt_len = 4  # 8 of its tokens are output another worker had generated
    bm.allocate(resumed)
    assert resumed.num_computed == 12 and resumed.usage()["cached_tokens"] == 4
