"""The broker's bookkeeping: live workers, their credit, jobs in flight and the bounded queue.

Pure data and decisions, no sockets: the broker process (broker.py) does the IO and asks this
module whom to send a job to, what to requeue and what has expired. The table is the one owner
of every job: jobs are added, finished and dropped only through it, so its indexes (by key, by
client, per model queue, per share) never disagree.

The queue is bounded in jobs and in bytes, and shared fairly: one client may hold at most
`client_share` of it, and one tenant of a client (the API key a gateway passes along) at most
`tenant_share`, so no client and no tenant can make the others BUSY. Within a model, jobs wait
in a lane per priority (lower leaves first, oldest first within one). A job leaves the queue
with an error when it waited max_queue_wait_s (BUSY) or its deadline passed (TIMEOUT: the
broker drops it without a worker ever seeing it).

Routing (`routing`): "least-loaded" sends a job to the live worker with free credit and the
fewest jobs in flight for its size (`slots`, its engine's whole capacity: unlike its credit
here, which is its share among its brokers, it does not move while brokers come and go, so a
burst resent from a lost broker does not all land on the worker that re-announced first);
"prefix" first asks the prefix index (affinity.py) which worker was sent the job's longest
prompt prefix and sends it there, so its KV cache serves it, unless that worker has more than
`affinity_slack` x its capacity in flight beyond the least loaded one: then least-loaded wins
(the prefix spills, and its index entries follow the new copy). Cold prefixes go least-loaded.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from zeroserve import protocol as p
from zeroserve.broker.affinity import PrefixIndex

JobKey = tuple[bytes, str]  # (client identity, request id)
ROUTINGS = ("prefix", "least-loaded")


@dataclass(slots=True, eq=False)
class Job:
    client: bytes
    rid: str
    model: str
    frames: list[bytes]  # [version, type, header, *buffers] exactly as the client sent them
    enqueued_at: float
    tenant: str = ""  # whose share of the queue it counts against, with its client
    trace: str = ""  # its traceparent, when the client traces it (zeroserve/tracing.py)
    prefix: list[bytes] = field(default_factory=list)  # its prompt's prefix hashes
    priority: int = 0  # lower leaves the queue first
    expires: float = 0.0  # monotonic time its deadline passes (0: none)
    waiting: bool = False  # in a queue now
    worker: WorkerState | None = None
    streamed: bool = False
    requeued: bool = False
    cancelled: bool = False  # its client left: the worker was told, its credit not yet back
    successor: Any = None  # the same request id sent again while cancelling: (msg, frames)

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.frames)

    @property
    def key(self) -> JobKey:
        return (self.client, self.rid)


@dataclass(slots=True, eq=False)
class WorkerState:
    identity: bytes
    worker_id: str
    models: tuple[str, ...]
    capacity: int  # its credit here: its share of `slots` among its live brokers
    info: dict[str, Any]
    expiry: float
    slots: int = 1  # its engine's whole capacity (>= capacity): what load is measured against
    registered_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    inflight: dict[JobKey, Job] = field(default_factory=dict)
    draining: bool = False
    served: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    peer_pid: int | None = None  # the kernel's word (SO_PEERCRED) that this pid sent READY

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
    """Workers by identity, jobs by (client, id) and by client, and a bounded FIFO queue per
    model with per-client and per-tenant shares."""

    def __init__(self, max_queue: int, max_queue_wait_s: float, max_queue_bytes: int = 1 << 62,
                 client_share: float = 1.0, tenant_share: float = 1.0,
                 routing: str = "least-loaded", affinity_slack: float = 0.25,
                 prefix_index_entries: int = 100_000) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {routing!r}")
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_queue_wait_s = max_queue_wait_s
        self.client_share, self.tenant_share = client_share, tenant_share
        self.workers: dict[bytes, WorkerState] = {}
        self.jobs: dict[JobKey, Job] = {}
        self.by_client: dict[bytes, dict[str, Job]] = {}
        self.queues: dict[str, dict[int, deque[Job]]] = {}  # model -> priority -> FIFO
        self.queued = 0
        self.queued_bytes = 0
        self.deadlines: list[tuple[float, int, Job]] = []  # heap of queued jobs' expiries
        self._tie = itertools.count()
        self.shares: dict[tuple[bytes, str | None], list[int]] = {}  # -> [jobs, bytes] queued
        self.known_models: set[str] = set()
        self._rr = 0
        self.routing, self.affinity_slack = routing, affinity_slack
        self.index = PrefixIndex(prefix_index_entries)
        # jobs routed by prefix: to its worker, spilled past it for load, or cold (no match)
        self.routed = {"affinity": 0, "spilled": 0, "cold": 0}

    # -- workers -------------------------------------------------------------------------

    def register(self, identity: bytes, info: dict[str, Any], expiry: float) -> WorkerState:
        models = tuple(str(m) for m in info.get("models") or ())
        capacity = int(info.get("capacity") or 1)
        if not models or capacity < 1:
            raise ValueError("READY needs models and a capacity >= 1")
        slots = max(capacity, int(info.get("slots") or capacity))
        worker = self.workers.get(identity)
        if worker is None:
            worker_id = str(info.get("worker_id") or identity.hex())
            if self.find_by_id(worker_id) is not None:  # no stealing a live worker's traffic
                raise ValueError(f"worker id {worker_id!r} is live under another connection")
            worker = WorkerState(identity, worker_id, models, capacity, info, expiry, slots)
            self.workers[identity] = worker
        else:
            worker.models, worker.capacity, worker.info = models, capacity, info
            worker.expiry, worker.slots = expiry, slots
        self.known_models.update(models)
        return worker

    def remove_worker(self, worker: WorkerState) -> tuple[list[Job], list[Job], list[Job]]:
        """Forget a worker; return (jobs to requeue, jobs that must fail with WORKER_LOST,
        jobs it was cancelling: gone now, but a successor may wait on one)."""
        self.workers.pop(worker.identity, None)
        self.index.forget(worker.identity)
        requeue, lost, cancelled = [], [], []
        for job in worker.inflight.values():
            job.worker = None
            if job.cancelled:
                self.drop(job)
                cancelled.append(job)
            elif job.streamed or job.requeued:
                self.drop(job)
                lost.append(job)
            else:
                job.requeued = True
                requeue.append(job)
        worker.inflight.clear()
        return requeue, lost, cancelled

    def expired_workers(self, now: float) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.expiry < now]

    def serves(self, model: str) -> bool:
        return any(model in w.models for w in self.workers.values() if not w.draining)

    def find_by_id(self, worker_id: str) -> WorkerState | None:
        return next((w for w in self.workers.values() if w.worker_id == worker_id), None)

    # -- jobs ----------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        self.jobs[job.key] = job
        self.by_client.setdefault(job.client, {})[job.rid] = job

    def drop(self, job: Job) -> None:
        """Forget a job that is in no queue and holds no credit."""
        if self.jobs.get(job.key) is job:
            del self.jobs[job.key]
            mine = self.by_client[job.client]
            del mine[job.rid]
            if not mine:
                del self.by_client[job.client]

    def jobs_of_client(self, client: bytes) -> list[Job]:
        """The client's live jobs (not those it left behind, being cancelled)."""
        return [j for j in self.by_client.get(client, {}).values() if not j.cancelled]

    # -- routing -------------------------------------------------------------------------

    def pick_worker(self, model: str, prefix: list[bytes] | None = None) -> WorkerState | None:
        """Where a job for `model` goes now (None: nowhere has credit): by prefix affinity,
        else the least loaded worker."""
        least = self._least_loaded(model)
        if least is None or not prefix or self.routing != "prefix":
            return least

        def eligible(identity: bytes) -> bool:
            w = self.workers.get(identity)
            return w is not None and not w.draining and model in w.models and w.free > 0

        holder = self.index.match(prefix, eligible)
        if holder is None:
            self.routed["cold"] += 1
            return least
        worker = self.workers[holder]
        if len(worker.inflight) - len(least.inflight) > self.affinity_slack * worker.capacity:
            self.routed["spilled"] += 1
            return least
        self.routed["affinity"] += 1
        return worker

    def _least_loaded(self, model: str) -> WorkerState | None:
        """The live, non-draining worker serving `model` with free credit and the fewest jobs in
        flight for its slots; ties rotate."""
        best: list[WorkerState] = []
        best_load = float("inf")
        for w in self.workers.values():
            if w.draining or model not in w.models or w.free <= 0:
                continue
            load = len(w.inflight) / w.slots
            if load < best_load:
                best, best_load = [w], load
            elif load == best_load:
                best.append(w)
        if not best:
            return None
        self._rr += 1
        return best[self._rr % len(best)]

    def assign(self, job: Job, worker: WorkerState) -> None:
        job.worker = worker
        worker.inflight[job.key] = job
        if job.prefix and self.routing == "prefix":
            self.index.record(job.prefix, worker.identity)

    def finish(self, job: Job) -> None:
        """A job ended (END or ERROR from its worker): forget it, give its credit back. A
        cancelled job was not served: its worker only confirmed the cancel."""
        self.drop(job)
        if job.worker is not None:
            job.worker.inflight.pop(job.key, None)
            job.worker.served += not job.cancelled

    # -- queue ---------------------------------------------------------------------------

    def why_not_enqueue(self, job: Job) -> str | None:
        """None when the queue has room for `job` within its client's and tenant's share,
        else why not (the text of the BUSY reply)."""
        size = job.nbytes
        if self.queued >= self.max_queue or self.queued_bytes + size > self.max_queue_bytes:
            return "all workers busy and queue full"
        for key, share, who in self._shares_of(job):
            jobs, nbytes = self.shares.get(key, (0, 0))
            if (jobs + 1 > max(1, int(self.max_queue * share))
                    or nbytes + size > self.max_queue_bytes * share):
                return f"all workers busy and this {who}'s share of the queue is full"
        return None

    def _shares_of(self, job: Job) -> list[tuple[tuple[bytes, str | None], float, str]]:
        out = [((job.client, None), self.client_share, "client")]
        if job.tenant:
            out.append(((job.client, job.tenant), self.tenant_share, "tenant"))
        return out

    def _count(self, job: Job, sign: int) -> None:
        job.waiting = sign > 0
        size = job.nbytes
        self.queued += sign
        self.queued_bytes += sign * size
        for key, _, _ in self._shares_of(job):
            tally = self.shares.setdefault(key, [0, 0])
            tally[0] += sign
            tally[1] += sign * size
            if tally[0] <= 0:
                del self.shares[key]

    def enqueue(self, job: Job, front: bool = False) -> None:
        q = self.queues.setdefault(job.model, {}).setdefault(job.priority, deque())
        if job.expires:
            if len(self.deadlines) > 2 * self.queued + 64:  # entries of jobs gone: compact
                self.deadlines = [e for e in self.deadlines if e[2].waiting]
                heapq.heapify(self.deadlines)
            heapq.heappush(self.deadlines, (job.expires, next(self._tie), job))
        if front:
            q.appendleft(job)
        else:
            q.append(job)
        self._count(job, +1)

    def dequeue_for(self, worker: WorkerState) -> list[Job]:
        """Pop queued jobs this worker can take now, most urgent priority first, oldest first
        within one, up to its free credit."""
        taken: list[Job] = []
        for model in worker.models:
            lanes = self.queues.get(model)
            while lanes and worker.free - len(taken) > 0 and not worker.draining:
                urgent = min(lanes)
                job = lanes[urgent].popleft()
                if not lanes[urgent]:
                    del lanes[urgent]
                self._count(job, -1)
                taken.append(job)
            self._prune(model)
        return taken

    def _prune(self, model: str) -> None:
        """Drop empty queues: model names come from clients, the map must not keep them."""
        lanes = self.queues.get(model)
        if lanes is not None:
            for priority in [p for p, q in lanes.items() if not q]:
                del lanes[priority]
            if not lanes:
                del self.queues[model]

    def unqueue(self, job: Job) -> bool:
        q = self.queues.get(job.model, {}).get(job.priority)
        if q is None:
            return False
        try:
            q.remove(job)
        except ValueError:
            return False
        self._count(job, -1)
        self._prune(job.model)
        return True

    def expired_jobs(self, now: float, settled: bool = True) -> list[tuple[Job, str, str]]:
        """Queued jobs to answer now, each with its error: past its deadline (TIMEOUT), waited
        longer than max_queue_wait_s (BUSY, or UNKNOWN_MODEL if nothing serves it), or, once
        the broker's workers are `settled` (all registered again), for a model none of them
        serves (UNKNOWN_MODEL: a new broker queues those until then)."""
        out: list[tuple[Job, str, str]] = []
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, job = heapq.heappop(self.deadlines)
            if self.unqueue(job):
                out.append((job, p.TIMEOUT, "its deadline passed while it was queued "
                            f"({(now - job.enqueued_at) * 1000:.0f} ms)"))
        limit = now - self.max_queue_wait_s
        for model, lanes in list(self.queues.items()):
            unknown = (settled and bool(self.workers) and not self.serves(model)
                       and model not in self.known_models)
            for q in lanes.values():
                while q and (unknown or q[0].enqueued_at < limit):
                    job = q.popleft()
                    self._count(job, -1)
                    known = self.serves(model) or model in self.known_models
                    out.append((job, p.BUSY if known else p.UNKNOWN_MODEL,
                                f"no worker serves {model!r}" if unknown else
                                f"no worker for {model!r} within "
                                f"{self.max_queue_wait_s * 1000:.0f} ms"))
            self._prune(model)
        for job, _, _ in out:
            self.drop(job)
        return out

    def next_queue_deadline(self) -> float | None:
        while self.deadlines and not self.deadlines[0][2].waiting:
            heapq.heappop(self.deadlines)  # it left the queue: nothing to expire
        heads = [q[0].enqueued_at + self.max_queue_wait_s for lanes in self.queues.values()
                 for q in lanes.values() if q]
        heads += [self.deadlines[0][0]] if self.deadlines else []
        return min(heads) if heads else None

    def stats(self) -> dict[str, Any]:
        return {
            "live_workers": len(self.workers),
            "queued": self.queued,
            "queued_bytes": self.queued_bytes,
            "in_flight": sum(len(w.inflight) for w in self.workers.values()),
            "capacity": sum(w.capacity for w in self.workers.values() if not w.draining),
            "routing": self.routing,
            "routed": dict(self.routed),
            "prefix_index": len(self.index),
        }
