"""One request's state inside the engine: prompt, outputs, slot, status, text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from zeroserve.workers.engine import RequestKey
from zeroserve.workers.llm.detok import IncrementalDetokenizer
from zeroserve.workers.llm.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    key: RequestKey
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None = None
    status: Status = Status.WAITING
    slot: int = -1
    num_computed: int = 0  # tokens whose K/V are in the cache
    output_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # chars of detok.text already streamed
    finish_reason: str | None = None
    logprobs: list[Any] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)
    queue_ms: float = 0.0  # from arrival to first scheduled

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= self.prompt_len

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.output_ids)

    def next_input(self) -> int:
        """The token a decode step feeds: the last one sampled."""
        return self.output_ids[-1]

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_len, "completion_tokens": len(self.output_ids)}
