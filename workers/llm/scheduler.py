"""Iteration-level scheduling: who runs in the next step, under a token and a block budget.

Each step, oldest first, every running sequence gets its next chunk: one token when it
decodes, a piece of its prompt (cut to the step's max_batched_tokens) while it prefills. A
sequence that needs a new KV block when none is free preempts the least urgent running
sequence (possibly itself): the victim frees its blocks and goes back to the queue, ahead of
everything of its priority, to recompute when blocks are free again. Then waiting sequences
are admitted while a seat (max_num_seqs), token budget and blocks remain; admission takes
cached prefix blocks first, needs only the blocks of the tokens a sequence has, and leaves a
small watermark of free blocks for the running ones to grow into.

Who goes first (`policy`): "priority" (vLLM's --scheduling-policy priority) admits the lowest
`priority` value first and preempts the highest, arrival order breaking ties (the newest of
a priority is preempted, so its oldest always progresses); a waiting sequence that finds no
seat or blocks displaces a running one of a less urgent priority, and prompt chunks take the
step's token budget most urgent first. "fcfs" admits in arrival order and preempts the
newest, whatever the priorities.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from zeroserve.workers.llm.block_manager import BlockManager
from zeroserve.workers.llm.sequence import Sequence, Status

POLICIES = ("priority", "fcfs")


@dataclass
class Plan:
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, tokens to compute)

    @property
    def empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batched_tokens: int,
                 policy: str = "priority") -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.by_priority = policy == "priority"
        self._arrivals = itertools.count()
        self.blocks = blocks
        self.max_num_seqs = max(1, min(max_num_seqs, max_batched_tokens))
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reset_figures()

    def add(self, seq: Sequence) -> None:
        seq.order = next(self._arrivals)
        self.waiting.append(seq)

    def _rank(self, seq: Sequence) -> tuple[int, int]:
        return (seq.params.priority if self.by_priority else 0), seq.order

    def _next_waiting(self) -> Sequence:
        """Whom admission considers next (the queue's head in arrival order under fcfs; a
        preempted sequence went back to its head)."""
        return min(self.waiting, key=self._rank) if self.by_priority else self.waiting[0]

    def expire(self, now: float) -> tuple[list[Sequence], list[Sequence]]:
        """Take out the sequences whose deadline (wall-clock) has passed: (waiting ones, which
        never ran, or were preempted; running ones)."""
        late = [s for s in (*self.waiting, *self.running)
                if s.params.deadline is not None and s.params.deadline <= now]
        self.deadline_misses += len(late)
        waiting = [s for s in late if s.status is Status.WAITING and not s.num_output]
        for seq in late:
            self.finish(seq)
        return waiting, [s for s in late if s not in waiting]

    def _displaceable(self, seq: Sequence) -> Sequence | None:
        """Under priority scheduling, the running sequence that gives its seat and blocks to
        `seq`: the least urgent, if it is less urgent than `seq` (never one of its priority,
        so two sequences cannot take turns evicting each other)."""
        if not self.by_priority or not self.running:
            return None
        victim = max(self.running, key=self._rank)
        return victim if victim.params.priority > seq.params.priority else None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        budget = self.max_batched_tokens
        planned: dict[Sequence, int] = {}
        preempted = False
        # decodes first (one token each, the streams' latency), then prompt chunks, the most
        # urgent first (under fcfs, in the order they were admitted)
        order = sorted(self.running, key=lambda s: (s.num_pending > 1, self._rank(s)))
        for seq in order:
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_pending, budget)
            if n <= 0:
                continue
            while not self.blocks.can_append(seq, n):
                preempted = True
                victim = max(self.running, key=self._rank)
                self._preempt(victim)
                budget += planned.pop(victim, 0)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.append(seq, n)
            planned[seq] = n
            budget -= n
        while self.waiting and budget > 0 and not preempted:
            seq = self._next_waiting()
            if (len(self.running) >= self.max_num_seqs
                    or not self.blocks.can_allocate(seq, bool(self.running), budget)):
                victim = self._displaceable(seq)
                if victim is None:
                    break
                self._preempt(victim)  # a less urgent sequence makes way for it
                budget += planned.pop(victim, 0)
                continue
            self.waiting.remove(seq)
            self.blocks.allocate(seq, budget)
            if not seq.preemptions:
                seq.queue_ms = (time.monotonic() - seq.arrived) * 1000
            seq.status = Status.RUNNING
            self.running.append(seq)
            planned[seq] = min(seq.num_pending, budget)
            budget -= planned[seq]
        self._measure(planned)
        return Plan(list(planned.items()))

    def _measure(self, planned: dict[Sequence, int]) -> None:
        """High-water marks: sequences running, KV in use (tokens of every layer), and what
        the same sequences would hold if every layer kept every token."""
        bs = self.blocks.block_size
        full = sum(-(-(s.num_computed + planned.get(s, 0)) // bs) for s in self.running) * bs
        self.max_running = max(self.max_running, len(self.running))
        self.kv_peak = max(self.kv_peak, self.blocks.tokens(used=True))
        self.kv_full_peak = max(self.kv_full_peak, full)

    def reset_figures(self) -> None:
        self.preemptions = self.max_running = self.kv_peak = self.kv_full_peak = 0
        self.deadline_misses = 0
        self.blocks.reset_figures()

    def figures(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "max_running": self.max_running, "preemptions": self.preemptions,
                "deadline_misses": self.deadline_misses,
                "kv_tokens_used_peak": self.kv_peak,
                "kv_tokens_full_attention_peak": self.kv_full_peak}

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out at once and free its blocks (finished or cancelled)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.free(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
