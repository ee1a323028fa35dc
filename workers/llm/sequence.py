"""One request's state inside the engine: its tokens, blocks, progress, status and text.

`token_ids` is the prompt followed by every token sampled so far; `num_computed` counts those
whose K/V sit in the sequence's blocks. Each step computes the next chunk of the rest: a prompt
chunk, or the one token sampled last (a decode). A preempted sequence loses its blocks and
recomputes its tokens (mostly from the prefix cache) when it runs again; nothing it streamed
is repeated, since sampling only ever happens past the last token it has.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from zeroserve.workers.engine import RequestKey
from zeroserve.workers.llm.detok import IncrementalDetokenizer
from zeroserve.workers.llm.params import SamplingParams


@dataclass(eq=False)
class Holding:
    """A sequence's blocks in one KV group (block_manager.py): block i holds positions
    [i * block_size, (i + 1) * block_size). A windowed group gives back the leading blocks
    its window no longer sees: their entries become the group's null block."""

    table: list[int] = field(default_factory=list)
    keyed: int = 0  # leading blocks already in the prefix cache
    dropped: int = 0  # leading blocks given back (windowed groups)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    key: RequestKey
    token_ids: list[int]  # prompt, then sampled tokens
    params: SamplingParams
    detok: IncrementalDetokenizer
    seed: int = 0  # sampling draws from (seed, token index): see sampler.py
    matcher: Any = None  # structured output: the grammar's matcher (grammar.py)
    status: Status = Status.WAITING
    prompt_len: int = 0
    num_computed: int = 0  # tokens whose K/V are in the blocks
    num_cached_tokens: int = 0  # of them, taken from the prefix cache at admission
    kv: list[Holding] = field(default_factory=list)  # its blocks in each KV group
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of full blocks
    cache_salt: bytes = b""  # the first block's key chains from it: prefixes per tenant
    emitted: int = 0  # chars of detok.text already streamed
    preemptions: int = 0
    order: int = 0  # arrival order in its engine (the scheduler's tie-break)
    arrived: float = field(default_factory=time.monotonic)
    queue_ms: float = 0.0  # from arrival to first scheduled

    def __post_init__(self) -> None:
        self.prompt_len = self.prompt_len or len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def block_table(self) -> list[int]:
        """Its blocks in the first KV group (the only one, unless layers differ in window)."""
        return self.kv[0].table if self.kv else []

    @property
    def total_len(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to compute before the next sample (1 while decoding)."""
        return len(self.token_ids) - self.num_computed

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_len, "completion_tokens": self.num_output,
                "cached_tokens": self.num_cached_tokens}
