"""Structured outputs: constrained decoding against a JSON schema (or any JSON object).

A request's `response_format` ({"type": "json_object"} or {"type": "json_schema", "schema":
{...}}) becomes an llguidance matcher on the prepare thread. Each step, before sampling, the
engine asks every constrained sequence's matcher for the tokens it allows next (one bitmask
row each, filled in parallel by llguidance's native threads) and masks those rows of the
logits in one vectorised operation; after sampling each matcher consumes its token. A matcher
that reaches the end of its grammar finishes the sequence ("stop"). Constrained and
unconstrained sequences share the batch; only the constrained rows pay.

Why llguidance and not xgrammar: both ship CPU wheels, but xgrammar requires triton (hundreds
of MB, of no use on CPU) and compiles each grammar ahead of use, while llguidance has no
dependencies, builds its lexer lazily (a new schema costs about a millisecond) and is the
engine behind OpenAI-style structured outputs in llama.cpp and vLLM's guidance backend.
Its torch helper applies the mask through torch.compile (seconds on first use, then ~10 ms a
call on CPU for a 1k vocabulary), so the mask is applied here by unpacking the bitmask with
shifts instead (tens of microseconds).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import torch

from zeroserve.workers.llm.transfer import to_device

MAX_SCHEMA_CHARS = 64 * 1024
CACHE_SIZE = 256  # compiled grammars kept, by schema


class GrammarError(ValueError):
    """A response_format that is malformed or that the grammar engine cannot compile."""


def parse_response_format(value: Any) -> dict[str, Any] | None:
    """The engine body's `response_format`: None (free text), or a JSON schema to follow."""
    if value is None or value == {"type": "text"}:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("json_object", "json_schema"):
        raise GrammarError("response_format must be {type: text | json_object | json_schema}")
    if value["type"] == "json_object":
        return {"type": "object"}
    schema = value.get("schema")
    if not isinstance(schema, dict):
        raise GrammarError("response_format json_schema needs a schema object")
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"the schema is over {MAX_SCHEMA_CHARS} characters")
    return schema


class Grammars:
    """Matchers for one tokenizer, with compiled grammars cached by schema."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        eos = sorted(eos_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                      eos_token=eos or None)
        self.vocab_size = vocab_size
        self.executor = llguidance.LLExecutor()
        self.cache: OrderedDict[str, str] = OrderedDict()

    def matcher(self, schema: dict[str, Any], emitted: list[int] = ()) -> Any:
        """A fresh matcher for `schema`, advanced past `emitted` (a resumed generation)."""
        key = json.dumps(schema, sort_keys=True)
        grammar = self.cache.get(key)
        if grammar is None:
            try:
                grammar = self._ll.LLMatcher.grammar_from_json_schema(
                    schema, defaults={"whitespace_flexible": False})  # compact JSON
            except Exception as exc:
                raise GrammarError(f"response_format schema: {exc}") from None
            failed, messages = self._ll.LLMatcher.validate_grammar_with_warnings(grammar)
            if failed:
                raise GrammarError(f"response_format schema: {'; '.join(messages)}")
            self.cache[key] = grammar
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        m = self._ll.LLMatcher(self.tokenizer, grammar)
        if m.is_error():
            raise GrammarError(f"response_format schema: {m.get_error()}")
        if emitted and not m.consume_tokens(list(emitted)):
            raise GrammarError("resume: the tokens already emitted do not follow the schema")
        return m

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, Any]]) -> torch.Tensor:
        """`logits` with -inf for every token each (row, matcher) pair does not allow next;
        the other rows as they were."""
        import llguidance.torch as lt

        bitmask = lt.allocate_token_bitmask(len(rows), self.vocab_size)
        lt.fill_next_token_bitmask_par(self.executor, [(m, j) for j, (_, m) in
                                                       enumerate(rows)], bitmask)
        allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        dev = logits.device
        idx = to_device([i for i, _ in rows], torch.long, dev)
        if dev.type == "cuda":  # llguidance fills pageable memory: pin it, copy without waiting
            bitmask = bitmask.pin_memory()
        allowed[idx] = unpack(bitmask.to(dev, non_blocking=True), logits.shape[-1])
        return logits.masked_fill(~allowed, float("-inf"))


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, W] int32 bitmask (bit t%32 of word t//32 allows token t) -> [R, vocab] bool."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32,
                                                        device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    out = bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()
    if out.shape[1] < vocab:  # logits wider than the tokenizer's vocabulary: never allowed
        pad = torch.zeros(out.shape[0], vocab - out.shape[1], dtype=torch.bool,
                          device=out.device)
        out = torch.cat([out, pad], dim=1)
    return out
