"""The LLM engine's own figures since it started (after warmup): steps, tokens, time in steps.

The engine counts prompt and generated tokens as requests come and tokens go; `step` records
one engine step from its plan's chunks. They travel on heartbeats (engine.stats) and the
gateway's /metrics exports them as zeroserve_worker_* (gateway/metrics.py).
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import Any

from zeroserve.protocol import STEP_BUCKETS_S


@dataclass
class StepFigures:
    steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0  # of the requests added
    batch_size: int = 0  # sequences in the latest step
    step_tokens: int = 0  # tokens in the latest step
    step_ms: float = 0.0  # the latest step's time
    busy_s: float = 0.0  # time spent in steps: utilisation over uptime
    prefill_tokens: int = 0  # prompt tokens computed
    decode_tokens: int = 0  # single-token decode rows
    # steps per STEP_BUCKETS_S bucket of their time; the last: +Inf
    step_s_buckets: list[int] = field(default_factory=lambda: [0] * (len(STEP_BUCKETS_S) + 1))

    def step(self, chunks: list[tuple[Any, int]], seconds: float) -> None:
        """One step that ran `chunks` ((sequence, tokens) each) in `seconds`."""
        self.steps += 1
        self.batch_size = len(chunks)
        self.step_tokens = sum(n for _, n in chunks)
        decoded = sum(1 for _, n in chunks if n == 1)
        self.decode_tokens += decoded
        self.prefill_tokens += self.step_tokens - decoded
        self.step_ms = seconds * 1000
        self.busy_s += seconds
        self.step_s_buckets[bisect.bisect_left(STEP_BUCKETS_S, seconds)] += 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
