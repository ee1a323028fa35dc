"""Prefix hashes (zeroserve/prefix.py): what a request tells the broker of its prompt."""

from __future__ import annotations

from zeroserve import prefix
from zeroserve.protocol import MAX_PREFIX_HASHES


def _chat(n: int) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"}
            for i in range(n)]


def test_the_next_turn_of_a_chat_shares_the_last_turns_deepest_hash() -> None:
    turn1 = prefix.hashes("m", "t", {"messages": _chat(3)})
    turn2 = prefix.hashes("m", "t", {"messages": _chat(5)})
    assert len(turn1) == 3 and turn2[:3] == turn1 and turn2[3] not in turn1
    other = prefix.hashes("m", "t", {"messages": [{"role": "user", "content": "other"}]})
    assert other[0] != turn1[0]


def test_hashes_are_salted_by_model_and_tenant() -> None:
    body = {"messages": _chat(2)}
    mine = prefix.hashes("m", "tenant-a", body)
    assert not set(mine) & set(prefix.hashes("m", "tenant-b", body))
    assert not set(mine) & set(prefix.hashes("other-model", "tenant-a", body))


def test_prompts_hash_by_full_blocks_and_only_the_deepest_are_kept() -> None:
    short = prefix.hashes("m", "", {"prompt": "x" * (prefix.BLOCK_BYTES - 1)})
    assert short == []  # no full block: nothing to match on
    doc = "word " * 2000
    longer = prefix.hashes("m", "", {"prompt": doc + "and a question"})
    assert len(longer) == MAX_PREFIX_HASHES and all(len(h) == prefix.HASH_BYTES for h in longer)
    assert longer[0] == prefix.hashes("m", "", {"prompt": doc[:prefix.BLOCK_BYTES]})[0]
    again = prefix.hashes("m", "", {"prompt": doc + "and another, longer question " * 10})
    assert set(longer) & set(again)  # the document's blocks match
    ids = prefix.hashes("m", "", {"prompt_token_ids": list(range(3 * prefix.BLOCK_TOKENS))})
    assert len(ids) == 3
    assert prefix.hashes("m", "", {"input": "an embedding"}) == []


def test_a_hash_stands_for_its_whole_prefix_and_text_ops_carry_none() -> None:
    doc = "".join(f"line {i}\n" for i in range(200))
    base = prefix.hashes("m", "", {"prompt": doc})
    changed = prefix.hashes("m", "", {"prompt": "X" + doc[1:]})  # one byte of the first block
    assert not set(base) & set(changed)  # every later hash differs too: each is a running hash
    ids = list(range(2 * prefix.BLOCK_TOKENS))
    assert prefix.hashes("m", "", {"prompt_token_ids": [*ids[:-1], "x"]}) == []  # not ids
    two = [{"role": "user", "content": "ab"}, {"role": "user", "content": "c"}]
    joined = [{"role": "user", "content": "a"}, {"role": "user", "content": "bc"}]
    assert prefix.hashes("m", "", {"messages": two})[-1] != prefix.hashes(
        "m", "", {"messages": joined})[-1]  # message boundaries count

    from zeroserve import protocol as p
    from zeroserve.client_core import ClientCore
    from zeroserve.config import ClientConfig
    from zeroserve.replies import ThreadCollector

    core = ClientCore(ClientConfig(("ipc:///x",)))
    core.submit("t", "m", {"op": "tokenize", "prompt": doc}, (), ThreadCollector(),
                resumable=False)
    sent = core.outgoing("t")
    assert sent is not None and "prefix" not in p.decode(sent[1]).header  # no KV, no route
