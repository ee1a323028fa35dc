"""Iteration-level scheduling: who runs in the next step, under a token budget.

Each step: every running sequence that has finished its prompt decodes one token; sequences
still in their prompt continue with a chunk; then waiting sequences are admitted while a KV
slot is free and the step's token budget (max_batched_tokens) lasts. A long prompt is cut into
chunks, so it never holds the running batch for more than one step's budget.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from zeroserve.workers.llm.kv_cache import KVCache
from zeroserve.workers.llm.sequence import Sequence, Status


@dataclass
class Plan:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, chunk length)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, kv: KVCache, max_num_seqs: int, max_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = min(max_num_seqs, kv.num_slots)
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        plan = Plan()
        budget = self.max_batched_tokens
        for seq in self.running:
            if seq.prefilled:
                plan.decodes.append(seq)
        budget -= len(plan.decodes)
        for seq in self.running:
            if not seq.prefilled and budget > 0:
                n = min(seq.prompt_len - seq.num_computed, budget)
                plan.prefills.append((seq, n))
                budget -= n
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and self.kv.can_allocate()):
            seq = self.waiting.popleft()
            seq.slot = self.kv.allocate()
            seq.status = Status.RUNNING
            seq.queue_ms = (time.monotonic() - seq.arrived) * 1000
            self.running.append(seq)
            n = min(seq.prompt_len, budget)
            plan.prefills.append((seq, n))
            budget -= n
        return plan

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out at once and free its slot (finished or cancelled)."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq.slot)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.slot = -1
