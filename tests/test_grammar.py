"""Constrained decoding (workers/llm/grammar.py): the bitmask unpacking, the grammar cache,
and an engine whose constrained sequences share a batch with free ones and resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from zeroserve.workers.llm.grammar import GrammarError, Grammars, parse_response_format, unpack

from .test_llm import engine, run_all  # noqa: F401 (the engine fixture)

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 5},
    "n": {"type": "integer", "minimum": 0, "maximum": 50},
    "ok": {"type": "boolean"}}, "required": ["name", "n", "ok"], "additionalProperties": False}


def test_unpack_matches_the_bit_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31 - 1, (3, 4), generator=gen, dtype=torch.int64)
    bitmask = words.to(torch.int32)
    got = unpack(bitmask, 120)
    want = [[bool((int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(120)]
            for r in range(3)]
    assert got.tolist() == want
    assert unpack(bitmask, 140)[:, 128:].any().item() is False  # past the mask: never allowed


def test_response_format_parsing() -> None:
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == {"type": "object"}
    assert parse_response_format({"type": "json_schema", "schema": SCHEMA}) == SCHEMA
    for bad in ({"type": "xml"}, {"type": "json_schema"}, "json",
                {"type": "json_schema", "schema": {"enum": ["x" * 70_000]}}):
        with pytest.raises(GrammarError):
            parse_response_format(bad)


def test_matchers_share_a_cached_grammar_and_refuse_bad_schemas(engine) -> None:  # noqa: F811
    g = Grammars(engine.tokenizer, engine.runner.vocab_size, engine.eos_ids)
    g.matcher(SCHEMA)
    g.matcher(dict(reversed(SCHEMA.items())))  # the same schema, keys in another order
    assert len(g.cache) == 1
    with pytest.raises(GrammarError, match="nope"):
        g.matcher({"type": "object", "properties": {"a": {"$ref": "#/nope"}}})


def test_constrained_and_free_share_a_batch_and_a_resume_continues_exactly(engine) -> None:  # noqa: F811
    body = {"prompt": "json please", "max_tokens": 120, "temperature": 1.0, "seed": 9,
            "response_format": {"type": "json_schema", "schema": SCHEMA}}
    free = {"prompt": "free text", "max_tokens": 30, "temperature": 1.0, "seed": 9}
    res = run_all(engine, {0: [("c", body), ("f", free)]})
    c = res["c"]
    assert c["finish"]["finish_reason"] == "stop"
    value = json.loads(c["text"])
    assert set(value) == {"name", "n", "ok"} and 0 <= value["n"] <= 50
    assert len(res["f"]["ids"]) == 30  # the free one was not held to the grammar
    # a worker lost after 4 tokens: another goes on from them, to the same JSON
    cut = c["ids"][:4]
    resumed = run_all(engine, {0: [("r", {**body, "resume": {
        "token_ids": cut, "text_chars": len(engine.tokenizer.decode(cut))}})]})["r"]
    assert cut + resumed["ids"] == c["ids"]
