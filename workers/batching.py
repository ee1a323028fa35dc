"""Dynamic batching for stateless engines (tensor modules, embeddings), Triton-style.

Requests queue up; a step takes the oldest ones up to `max_batch_size` rows (a larger
request runs alone) and runs them as one batch. Under load a step waits up to
`max_queue_delay_ms` for a fuller batch; a worker that was idle runs the first request at
once, with no delay. Inputs that arrived as shared-memory
descriptors are released as soon as the batch has run. Outputs go back through this worker's
arena (one copy) when the request's `shm_domain` is this worker's (see arena.py), else as raw
frames; shared-memory inputs from another domain are refused with SHM_UNREACHABLE.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from zeroserve import protocol as p
from zeroserve import tensors
from zeroserve.arena import Arena, DescriptorError, Mappings, shm_domain
from zeroserve.workers.engine import EngineError, Output, RequestKey


@dataclass(slots=True)
class Pending:
    key: RequestKey
    inputs: Any  # what the subclass parsed: tensors, texts, ...
    rows: int
    reply_shm: bool
    arrived: float = field(default_factory=time.monotonic)
    release: list[dict[str, Any]] = field(default_factory=list)


class BatchingEngine:
    def __init__(self, model: str, max_batch_size: int, max_queue_delay_ms: float,
                 device: str) -> None:
        self.models = (model,)
        self.device = device
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_ms / 1000
        self.capacity = max_batch_size * 4
        self.queue: deque[Pending] = deque()
        self.arena = Arena()
        self.maps = Mappings()
        self.last_run_end = 0.0
        self.counters = {"batches": 0, "rows": 0, "batch_size": 0}

    # -- subclass hooks ------------------------------------------------------------------

    def parse(self, body: dict[str, Any], frames: list[bytes]) -> tuple[Any, int, list]:
        """Body -> (inputs, rows, shm descriptors to release after the run)."""
        raise NotImplementedError

    def run(self, batch: list[Pending]) -> list[dict[str, Any]]:
        """Run one batch; per request, a dict of output tensors (and usage)."""
        raise NotImplementedError

    # -- the Engine interface ------------------------------------------------------------

    def add(self, key: RequestKey, body: dict[str, Any], buffers: list[bytes]) -> None:
        same_shm = body.get("shm_domain") == shm_domain()
        if not same_shm and tensors.shm_descriptors(body.get("inputs")):
            raise EngineError(p.SHM_UNREACHABLE, "this worker cannot map the sender's shared "
                                                 "memory: send the tensors as frames")
        try:
            inputs, rows, release = self.parse(body, buffers)
        except DescriptorError as exc:
            raise EngineError(p.BAD_REQUEST, str(exc)) from None
        self.queue.append(Pending(key, inputs, rows, same_shm, release=release))

    def cancel(self, key: RequestKey) -> list[Output]:
        for req in self.queue:
            if req.key == key:
                self.queue.remove(req)
                self._release(req)
                return [Output(key, finish={"finish_reason": "cancelled"})]
        return []

    def abort_all(self, code: str, message: str) -> list[Output]:
        outs = [Output(req.key, error=(code, message)) for req in self.queue]
        for req in self.queue:
            self._release(req)
        self.queue.clear()
        return outs

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[Output]:
        now = time.monotonic()
        loaded = now - self.last_run_end < self.delay_s  # a batch just ran: more may come
        if (loaded and sum(r.rows for r in self.queue) < self.max_batch_size
                and now - self.queue[0].arrived < self.delay_s):
            time.sleep(min(0.0005, self.delay_s))  # give a fuller batch a moment to arrive
            return []
        batch: list[Pending] = []
        taken = 0
        while self.queue and (not batch or taken + self.queue[0].rows <= self.max_batch_size):
            req = self.queue.popleft()
            batch.append(req)
            taken += req.rows
        try:
            with torch.inference_mode():
                results = self.run(batch)
        except EngineError as exc:
            return [Output(r.key, error=(exc.code, str(exc))) for r in batch]
        finally:
            for req in batch:
                self._release(req)
        self.last_run_end = time.monotonic()
        c = self.counters
        c["batches"] += 1
        c["rows"] += taken
        c["batch_size"] = len(batch)
        return [self._reply(req, out) for req, out in zip(batch, results, strict=True)]

    def _reply(self, req: Pending, result: dict[str, Any]) -> Output:
        usage = result.pop("usage", {})
        try:
            entries, frames = tensors.pack(result, self.arena if req.reply_shm else None)
        except MemoryError:  # arena full: fall back to frames
            entries, frames = tensors.pack(result, None)
        return Output(req.key, finish={"finish_reason": "stop", "outputs": entries,
                                       "usage": usage}, buffers=frames)

    def _release(self, req: Pending) -> None:
        for desc in req.release:
            self.maps.release(desc)
        req.release = []

    def warmup(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"running": 0, "waiting": len(self.queue), **self.counters, **self.arena.stats()}

    def close(self) -> None:
        self.abort_all(p.UNAVAILABLE, "engine closing")
        self.arena.close()


def split_rows(out: torch.Tensor, batch: list[Pending]) -> list[torch.Tensor]:
    """Split a batched output back per request along dim 0."""
    if len(batch) == 1:
        return [out]
    total = sum(r.rows for r in batch)
    if out.dim() == 0 or out.shape[0] != total:
        raise EngineError(p.INTERNAL, f"batched output has {tuple(out.shape)}, expected "
                                      f"{total} rows")
    return list(torch.split(out, [r.rows for r in batch]))
