"""The broker process: a switchboard between clients and workers. It owns no model.

Binds:
    frontend  ROUTER  clients and gateways connect DEALER sockets here.
    backend   ROUTER  workers connect DEALER sockets here.
    admin     ROUTER  operators' tools connect here for state-changing ADMIN ops (admin.py).

Frontend in:  REQUEST, CANCEL, HEARTBEAT, DISCONNECT, ADMIN {op: workers | stats} (read-only),
              handled by frontend.py's table
Frontend out: CHUNK, CHUNKS, END, ERROR (request-scoped), HEARTBEAT {epoch} (echo of the
              client's)
Backend in:   READY, HEARTBEAT, CHUNK, CHUNKS, END, ERROR, DRAIN (worker's own SIGTERM),
              DISCONNECT, handled by backend.py's table (READY: `register` here)
Backend out:  REQUEST, CANCEL, HEARTBEAT, DRAIN, DISCONNECT (each behind a route frame)

Each REQUEST goes to the live worker that serves its model and holds its prompt's longest
prefix (by the prefix hashes in its header), unless that one is loaded well past the others,
else to the least loaded one with credit (table.py, affinity.py); with no credit anywhere
it waits in a bounded, fairly shared queue (table.py; full, over its client's or tenant's
share, or too old: BUSY). Replies to a client that reads slowly wait in a bounded
backlog (outbox.py), and so do messages to a worker whose pipe is full. A client that
leaves has its requests cancelled; their credit comes back when the worker confirms the
cancel (or is purged). A worker that goes silent for
heartbeat_interval_s x heartbeat_liveness, or whose local process ends (liveness.py), is purged:
its unstarted jobs are requeued once, the others fail with WORKER_LOST (the SDK then resumes
them elsewhere). A malformed frame gets an ERROR back and one log line.
With CURVE keys (auth.py) each socket admits peers by public key and role; cli.py is the CLI.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

import zmq

from zeroserve import protocol as p
from zeroserve import tracing
from zeroserve.broker.admin import Admin
from zeroserve.broker.backend import Backend
from zeroserve.broker.frontend import Frontend
from zeroserve.broker.liveness import PidWatch, peer_pid
from zeroserve.broker.outbox import Outbox, Sent
from zeroserve.broker.table import Job, Table, WorkerState, same_process
from zeroserve.config import BrokerConfig
from zeroserve.logs import RateLimitedLog
from zeroserve.procs import trim_heap
from zeroserve.sockets import (
    EndpointInUseError,
    check_transport,
    ipc_in_use,
    make_socket,
    private_ipc,
    recv_sourced,
)

log = logging.getLogger("zeroserve.broker")

BATCH = 512  # messages drained per socket per poll wake-up, so neither side starves the other
BATCH_S = 0.02  # ... and at most this long, so timers (heartbeats, expiry) keep their pace
MAX_FRAMES = 2 + 3 + p.MAX_BUFFERS  # identity, route, version, type, header, buffers
TRIM_AFTER = 1_000  # messages handled before a heartbeat tick trims the heap (1-3 ms)
NO_ROUTE = b""


class Broker:
    def __init__(self, cfg: BrokerConfig, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.table = Table(cfg.max_queue, cfg.max_queue_wait_ms / 1000, cfg.max_queue_bytes,
                           cfg.client_share, cfg.tenant_share, cfg.routing, cfg.affinity_slack,
                           cfg.prefix_index_entries)
        self.clients: dict[bytes, float] = {}  # client identity -> last time heard from
        self.frontend = make_socket(self.ctx, zmq.ROUTER, cfg.sockets, router_mandatory=True)
        self.backend = make_socket(self.ctx, zmq.ROUTER, cfg.sockets, router_mandatory=True)
        self.admin = make_socket(self.ctx, zmq.ROUTER, cfg.sockets, router_mandatory=True)
        self.outbox = Outbox(self.frontend, cfg.client_backlog)
        # the same for workers: a full pipe to a busy worker is a backlog, not a dead worker
        self.to_workers = Outbox(self.backend, cfg.client_backlog)
        self.auth = None
        if cfg.keys_dir:
            from zeroserve.broker.auth import secure

            self.auth = secure(self.ctx, cfg.keys_dir, cfg.key_name, self.frontend, self.backend,
                               self.admin)
        self.poller = zmq.Poller()
        self.pids = PidWatch()
        self.bad_frames = RateLimitedLog(log)
        self.errors = RateLimitedLog(log)
        self.running = True  # until stop(): a SIGTERM during start-up is not lost
        # new with every process: in its heartbeats, so a client learns of a restart at once
        # and sends again what died with the old process (protocol.py, client_core.py)
        self.epoch = uuid.uuid4().hex[:16]
        self.born = time.monotonic()  # workers register again over the first expiry_s
        self.beat = p.encode(p.HEARTBEAT, {"epoch": self.epoch})
        self.counts = {"requests": 0, "busy": 0, "timeout": 0, "lost": 0, "bad_frames": 0,
                       "backlogged": 0, "slow_clients": 0}
        self._next_heartbeat = 0.0
        self.handled = 0  # messages since the heap was last trimmed
        # each socket's handlers, one per message type, over this broker (hub.py)
        self.from_clients, self.from_workers = Frontend(self), Backend(self)
        self.from_admins = Admin(self)

    # -- lifecycle -----------------------------------------------------------------------

    def bind(self) -> None:
        endpoints = ((self.frontend, self.cfg.frontend), (self.backend, self.cfg.backend),
                     (self.admin, self.cfg.admin))
        check_transport([e for _, e in endpoints], self.auth is not None,
                        self.cfg.sockets.insecure, log)
        for _, endpoint in endpoints:  # all checked before any is bound
            private_ipc(endpoint)
            if ipc_in_use(endpoint):
                raise EndpointInUseError(
                    f"{endpoint}: a live process listens there (another broker?); stop it "
                    "first, or pick another --instance or endpoint")
        for sock, endpoint in endpoints:
            sock.bind(endpoint)
        log.info("broker bound frontend=%s backend=%s admin=%s epoch=%s", self.cfg.frontend,
                 self.cfg.backend, self.cfg.admin, self.epoch)

    def stop(self, *_: Any) -> None:
        self.running = False

    def close(self) -> None:
        for w in list(self.table.workers.values()):
            self.send_worker(w, NO_ROUTE, p.encode(p.DISCONNECT, {"reason": "broker stopping"}))
        for job in [j for j in self.table.jobs.values() if not j.cancelled]:
            self.send_client(job.client, p.error(job.rid, p.UNAVAILABLE, "broker stopping"))
        for sock in (self.frontend, self.backend, self.admin):
            sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.pids.close()
        log.info("broker stopped: %s", self.counts)

    def run(self) -> None:
        for sock in (self.frontend, self.backend, self.admin):
            self.poller.register(sock, zmq.POLLIN)
        while self.running:
            backlog = self.outbox.backlog or self.to_workers.backlog
            wait = 0.005 if backlog else 0.2  # a slow reader: flush again soon
            timeout_ms = max(0.0, min(self._next_deadline() - time.monotonic(), wait)) * 1000
            events = dict(self.poller.poll(timeout_ms))
            for fd in [e for e in events if isinstance(e, int)]:  # a local worker's pidfd
                self._process_ended(fd)
            if self.backend in events:
                self._read_batch(self.backend, self.from_workers.on_message, sourced=True)
            if self.frontend in events:
                self._read_batch(self.frontend, self.from_clients.on_message)
            if self.admin in events:
                self._read_batch(self.admin, self.from_admins.on_message)
            self._on_timers(time.monotonic())
            if self.outbox.backlog:
                for client in self.outbox.flush():
                    self.from_clients.client_gone(client)
            if self.to_workers.backlog:
                for identity in self.to_workers.flush():
                    if (worker := self.table.workers.get(identity)) is not None:
                        self.purge(worker, "unreachable")

    def _read_batch(self, sock: zmq.Socket, handler: Any, sourced: bool = False) -> None:
        end = time.monotonic() + BATCH_S
        for _ in range(BATCH):
            if time.monotonic() > end:
                return
            try:
                frames, fd = recv_sourced(sock, MAX_FRAMES, zmq.NOBLOCK, sourced)
            except zmq.Again:
                return
            self.handled += 1
            try:
                handler(frames, fd) if sourced else handler(frames)
            except Exception:  # a bug must not take the switchboard down: log it, go on
                self.counts["bad_frames"] += 1
                self.errors.exception("unexpected error handling a message")

    def drain(self, worker: WorkerState, why: str) -> None:
        self.send_worker(worker, NO_ROUTE, p.encode(p.DRAIN, {}))
        self.stop_routing(worker, why)

    def send_quiet(self, sock: zmq.Socket, frames: list) -> None:
        with contextlib.suppress(zmq.ZMQError):  # a peer that left needs no answer
            sock.send_multipart(frames, zmq.NOBLOCK)

    # -- backend: workers (backend.py handles the rest) ---------------------------------

    def register(self, identity: bytes, msg: p.Message, fd: int) -> None:
        """A READY: the worker joins the table (or is refused), its process watched."""
        # the kernel's word for which process sent it (ipc only); a quoted pid alone is not
        peer = peer_pid(fd)
        verified = peer is not None and peer == msg.header.get("pid")
        live = self.table.find_by_id(str(msg.header.get("worker_id") or ""))
        if (live is not None and live.identity != identity and verified
                and live.peer_pid == peer and same_process(live.info, msg.header)):
            self.purge(live, "reconnected")  # the same process on a new connection
        try:
            worker = self.table.register(
                identity, msg.header, time.monotonic() + self.cfg.expiry_s
            )
        except (TypeError, ValueError) as exc:
            self.counts["bad_frames"] += 1
            self.bad_frames.warning("refused READY from %s: %s", identity.hex(), exc)
            self.send_raw_backend(identity, p.encode(p.DISCONNECT, {"reason": str(exc)}))
            return
        worker.peer_pid = peer if verified else None
        worker.stats = msg.header.get("stats") or worker.stats
        pidfd = self.pids.watch(identity, msg.header) if verified else None
        if pidfd is not None:
            self.poller.register(pidfd, zmq.POLLIN)
        log.info(
            "worker registered id=%s models=%s capacity=%d pid=%s device=%s cpus=%s",
            worker.worker_id, ",".join(worker.models), worker.capacity,
            msg.header.get("pid"), msg.header.get("device"), msg.header.get("cpus"),
        )
        self.dispatch_queued(worker)

    def after_cancel(self, job: Job) -> None:
        """A cancelled job is gone for good: the request sent again meanwhile goes now."""
        if job.successor is not None:
            self.from_clients.on_request(job.client, *job.successor)

    def after_credit(self, worker: WorkerState) -> None:
        if worker.draining:
            if not worker.inflight:
                self.send_worker(worker, NO_ROUTE, p.encode(p.DISCONNECT, {"reason": "drained"}))
                log.info("worker drained id=%s served=%d", worker.worker_id, worker.served)
                self.table.remove_worker(worker)
            return
        if self.table.queued:
            self.dispatch_queued(worker)

    def stop_routing(self, worker: WorkerState, why: str) -> None:
        if not worker.draining:
            worker.draining = True
            log.info("worker draining id=%s in_flight=%d (%s)", worker.worker_id,
                     len(worker.inflight), why)
        if not worker.inflight:
            self.after_credit(worker)

    # -- dispatch and failure handling ---------------------------------------------------

    def dispatch(self, job: Job, worker: WorkerState) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s model=%s -> worker %s", job.rid, job.model, worker.worker_id)
        self.table.assign(job, worker)
        if job.trace and tracing.enabled():  # arrival (or requeue) to now
            now = tracing.now_ns()
            tracing.record("broker.queue", job.trace,
                           now - int((time.monotonic() - job.enqueued_at) * 1e9), now,
                           worker=worker.worker_id, model=job.model, requeued=job.requeued)
        if not self.send_worker(worker, job.client, job.frames):
            self.purge(worker, "unreachable")

    def dispatch_queued(self, worker: WorkerState) -> None:
        for job in self.table.dequeue_for(worker):
            self.dispatch(job, worker)
            if worker.identity not in self.table.workers:
                return

    def _process_ended(self, fd: int) -> None:
        self.poller.unregister(fd)
        worker = self.table.workers.get(self.pids.ended(fd) or b"")
        if worker is not None:
            self.purge(worker, "process exited")

    def purge(self, worker: WorkerState, why: str) -> None:
        if worker.identity not in self.table.workers:
            return
        self.to_workers.drop(worker.identity)
        requeue, lost, cancelled = self.table.remove_worker(worker)
        log.warning("worker purged id=%s (%s): %d requeued, %d lost", worker.worker_id, why,
                    len(requeue), len(lost))
        for job in lost:
            self.counts["lost"] += 1
            self.send_client(job.client, p.error(job.rid, p.WORKER_LOST,
                                                  f"worker {worker.worker_id} lost: {why}"))
        for job in reversed(requeue):
            self.table.enqueue(job, front=True)
        for job in cancelled:
            self.after_cancel(job)
        for w in list(self.table.workers.values()):
            if self.table.queued:
                self.dispatch_queued(w)

    # -- timers --------------------------------------------------------------------------

    def _next_deadline(self) -> float:
        deadline = self._next_heartbeat
        qd = self.table.next_queue_deadline()
        if qd is not None:
            deadline = min(deadline, qd)
        return deadline

    def _on_timers(self, now: float) -> None:
        for job, code, message in self.table.expired_jobs(now, now - self.born
                                                          > self.cfg.expiry_s):
            self.counts["busy" if code == p.BUSY else "timeout"] += code in (p.BUSY, p.TIMEOUT)
            self.send_client(job.client, p.error(job.rid, code, message))
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.cfg.heartbeat_interval_s
        # a busy broker is not a silent worker: read what they sent before judging them
        self._read_batch(self.backend, self.from_workers.on_message)
        for worker in self.table.expired_workers(now):
            self.purge(worker, "heartbeat expired")
        if self.handled >= TRIM_AFTER:  # a burst is over (or goes on): hand back its memory
            self.handled = 0
            trim_heap()
        for worker in list(self.table.workers.values()):
            self.send_worker(worker, NO_ROUTE, self.beat, droppable=True)
        silent = [c for c, seen in self.clients.items() if now - seen > self.cfg.expiry_s]
        for client in silent:
            quiet_s = now - self.clients[client]
            self.from_clients.client_gone(client, f"silent for {quiet_s:.1f} s: cancelled")

    # -- sending -------------------------------------------------------------------------

    def send_client(self, client: bytes, frames: list, droppable: bool = False) -> bool:
        sent = self.outbox.send(client, frames, droppable)
        if sent is Sent.GONE:
            log.info("client %s unreachable: cancelling its requests", client.hex())
            self.from_clients.client_gone(client)
        elif sent is Sent.QUEUED:
            self.counts["backlogged"] += 1
        elif sent is Sent.OVERFLOW:
            self.counts["slow_clients"] += 1
            self.from_clients.client_gone(client, f"fell {self.cfg.client_backlog} messages behind")
        return sent in (Sent.SENT, Sent.QUEUED)

    def send_worker(self, worker: WorkerState, route: bytes, frames: list,
                    droppable: bool = False) -> bool:
        """False when the worker cannot be reached (gone, or `client_backlog` behind)."""
        sent = self.to_workers.send(worker.identity, [route, *frames], droppable)
        return sent in (Sent.SENT, Sent.QUEUED)

    def send_raw_backend(self, identity: bytes, frames: list) -> None:
        self.send_quiet(self.backend, [identity, NO_ROUTE, *frames])

    def bad_frame(self, side: str, peer: bytes, exc: Exception) -> None:
        self.counts["bad_frames"] += 1
        self.bad_frames.warning("malformed frame on %s from %s: %s", side, peer.hex(), exc)

