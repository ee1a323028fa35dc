"""The broker's bookkeeping: live workers, their credit, jobs in flight and the bounded queue.

Pure data and decisions, no sockets: the broker process (broker.py) does the IO and asks this
module whom to send a job to, what to requeue and what has expired.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

JobKey = tuple[bytes, str]  # (client identity, request id)


@dataclass(slots=True, eq=False)
class Job:
    client: bytes
    rid: str
    model: str
    frames: list[bytes]  # [version, type, header, *buffers] exactly as the client sent them
    enqueued_at: float
    worker: WorkerState | None = None
    streamed: bool = False
    requeued: bool = False

    @property
    def key(self) -> JobKey:
        return (self.client, self.rid)


@dataclass(slots=True, eq=False)
class WorkerState:
    identity: bytes
    worker_id: str
    models: tuple[str, ...]
    capacity: int
    info: dict[str, Any]
    expiry: float
    registered_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    inflight: dict[JobKey, Job] = field(default_factory=dict)
    draining: bool = False
    served: int = 0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.capacity - len(self.inflight)

    def row(self, now: float) -> dict[str, Any]:
        """One line of the worker table that status tools read."""
        return {
            "worker_id": self.worker_id,
            "models": list(self.models),
            "capacity": self.capacity,
            "in_flight": len(self.inflight),
            "served": self.served,
            "draining": self.draining,
            "last_heartbeat_s_ago": round(now - self.last_heartbeat, 3),
            "uptime_s": round(now - self.registered_at, 3),
            "stats": self.stats,
            **{k: self.info.get(k) for k in ("pid", "host", "cpus", "device", "engine")},
        }


def same_process(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two READYs from one process (pid, boot and start time agree): a reconnect, not a
    second worker claiming the id (procs.identity; `started` is not in the public table)."""
    keys = ("pid", "boot_id", "started")
    return a.get("pid") is not None and all(a.get(k) == b.get(k) for k in keys)


class Table:
    """Workers by identity, jobs by (client, id), and a bounded FIFO queue per model."""

    def __init__(self, max_queue: int, max_queue_wait_s: float) -> None:
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self.workers: dict[bytes, WorkerState] = {}
        self.jobs: dict[JobKey, Job] = {}
        self.queues: dict[str, deque[Job]] = {}
        self.queued = 0
        self.known_models: set[str] = set()
        self._rr = 0

    # -- workers -------------------------------------------------------------------------

    def register(self, identity: bytes, info: dict[str, Any], expiry: float) -> WorkerState:
        models = tuple(str(m) for m in info.get("models") or ())
        capacity = int(info.get("capacity") or 1)
        if not models or capacity < 1:
            raise ValueError("READY needs models and a capacity >= 1")
        worker = self.workers.get(identity)
        if worker is None:
            worker_id = str(info.get("worker_id") or identity.hex())
            if self.find_by_id(worker_id) is not None:  # no stealing a live worker's traffic
                raise ValueError(f"worker id {worker_id!r} is live under another connection")
            worker = WorkerState(identity, worker_id, models, capacity, info, expiry)
            self.workers[identity] = worker
        else:
            worker.models, worker.capacity, worker.info = models, capacity, info
            worker.expiry = expiry
        self.known_models.update(models)
        return worker

    def remove_worker(self, worker: WorkerState) -> tuple[list[Job], list[Job]]:
        """Forget a worker; return (jobs to requeue, jobs that must fail with WORKER_LOST)."""
        self.workers.pop(worker.identity, None)
        requeue, lost = [], []
        for job in worker.inflight.values():
            job.worker = None
            if job.streamed or job.requeued:
                self.jobs.pop(job.key, None)
                lost.append(job)
            else:
                job.requeued = True
                requeue.append(job)
        worker.inflight.clear()
        return requeue, lost

    def expired_workers(self, now: float) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.expiry < now]

    def serves(self, model: str) -> bool:
        return any(model in w.models for w in self.workers.values() if not w.draining)

    def find_by_id(self, worker_id: str) -> WorkerState | None:
        return next((w for w in self.workers.values() if w.worker_id == worker_id), None)

    # -- routing -------------------------------------------------------------------------

    def pick_worker(self, model: str) -> WorkerState | None:
        """The live, non-draining worker serving `model` with the most free credit; ties rotate."""
        best: list[WorkerState] = []
        best_free = 0
        for w in self.workers.values():
            if w.draining or model not in w.models:
                continue
            free = w.capacity - len(w.inflight)
            if free > best_free:
                best, best_free = [w], free
            elif free == best_free and free > 0:
                best.append(w)
        if not best:
            return None
        self._rr += 1
        return best[self._rr % len(best)]

    def assign(self, job: Job, worker: WorkerState) -> None:
        job.worker = worker
        worker.inflight[job.key] = job

    def finish(self, key: JobKey) -> Job | None:
        """A job ended (END or ERROR from its worker): free its credit."""
        job = self.jobs.pop(key, None)
        if job is not None and job.worker is not None:
            job.worker.inflight.pop(key, None)
            job.worker.served += 1
        return job

    # -- queue ---------------------------------------------------------------------------

    def can_enqueue(self) -> bool:
        return self.queued < self.max_queue

    def enqueue(self, job: Job, front: bool = False) -> None:
        q = self.queues.setdefault(job.model, deque())
        if front:
            q.appendleft(job)
        else:
            q.append(job)
        self.queued += 1

    def dequeue_for(self, worker: WorkerState) -> list[Job]:
        """Pop queued jobs this worker can take now, oldest first, up to its free credit."""
        taken: list[Job] = []
        for model in worker.models:
            q = self.queues.get(model)
            while q and worker.free - len(taken) > 0 and not worker.draining:
                taken.append(q.popleft())
                self.queued -= 1
            self._prune(model)
        return taken

    def _prune(self, model: str) -> None:
        """Drop an empty queue: model names come from clients, the map must not keep them."""
        if model in self.queues and not self.queues[model]:
            del self.queues[model]

    def unqueue(self, job: Job) -> bool:
        q = self.queues.get(job.model)
        if q is None:
            return False
        try:
            q.remove(job)
        except ValueError:
            return False
        self.queued -= 1
        self._prune(job.model)
        return True

    def expired_jobs(self, now: float) -> list[Job]:
        """Queued jobs that waited longer than max_queue_wait_s (queues are FIFO by age)."""
        out: list[Job] = []
        limit = now - self.max_queue_wait_s
        for model, q in list(self.queues.items()):
            while q and q[0].enqueued_at < limit:
                out.append(q.popleft())
                self.queued -= 1
            self._prune(model)
        for job in out:
            self.jobs.pop(job.key, None)
        return out

    def next_queue_deadline(self) -> float | None:
        heads = [q[0].enqueued_at for q in self.queues.values() if q]
        return min(heads) + self.max_queue_wait_s if heads else None

    def jobs_of_client(self, client: bytes) -> list[Job]:
        return [j for j in self.jobs.values() if j.client == client]

    def stats(self) -> dict[str, Any]:
        return {
            "live_workers": len(self.workers),
            "queued": self.queued,
            "in_flight": sum(len(w.inflight) for w in self.workers.values()),
            "capacity": sum(w.capacity for w in self.workers.values() if not w.draining),
        }
