"""The broker's backend: what workers send it, one handler per message type (`handlers`).

Messages in (on the backend ROUTER, behind the worker's identity and the client route it
echoes): READY (registration: the broker's own `register`), CHUNK, CHUNKS, END, ERROR (a
request's reply, forwarded to its client), HEARTBEAT {stats}, DRAIN (the worker's own
SIGTERM), DISCONNECT. A peer that never registered is asked to (DISCONNECT "not registered");
a malformed frame gets an ERROR back and one log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from zeroserve import protocol as p
from zeroserve.broker.hub import Hub
from zeroserve.broker.table import WorkerState

log = logging.getLogger("zeroserve.broker")

Handler = Callable[[WorkerState, bytes, p.Message, list], None]


class Backend:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.handlers: dict[int, Handler] = {
            p.CHUNK: self._on_reply, p.END: self._on_reply, p.ERROR: self._on_reply,
            p.CHUNKS: self._on_chunks, p.HEARTBEAT: self._on_heartbeat,
            p.DRAIN: self._on_drain, p.DISCONNECT: self._on_disconnect}

    def on_message(self, frames: list[bytes], fd: int = -1) -> None:
        # the ROUTER's identity frame, the client's route the worker echoes, then the message
        hub = self.hub
        identity, message = frames[0], frames[2:]
        worker = hub.table.workers.get(identity)
        try:
            if len(frames) < 2:
                raise p.ProtocolError("missing route frame")
            msg = p.decode(message, hub.cfg.sockets.max_message_bytes)
        except p.ProtocolError as exc:
            hub.bad_frame("backend", identity, exc)
            hub.send_raw_backend(identity, p.error(p.rid_of(message), p.BAD_REQUEST, str(exc)))
            return
        if worker is not None:
            worker.expiry = time.monotonic() + hub.cfg.expiry_s
            worker.last_heartbeat = time.time()
        handler = self.handlers.get(msg.type)
        if msg.type == p.READY:
            hub.register(identity, msg, fd)
        elif worker is None:  # unknown peer (e.g. we restarted): it registers again
            hub.send_raw_backend(identity, p.encode(p.DISCONNECT, {"reason": "not registered"}))
        elif handler is None:
            hub.bad_frame("backend", identity,
                          p.ProtocolError(f"{p.TYPE_NAMES[msg.type]} from worker"))
        else:
            handler(worker, frames[1], msg, message)

    def _on_reply(self, worker: WorkerState, route: bytes, msg: p.Message,
                  frames: list) -> None:
        hub = self.hub
        job = hub.table.jobs.get((route, msg.header["id"]))
        if job is None or job.worker is not worker:
            return  # late reply of a job that was cancelled or reassigned
        if job.cancelled:  # its client left: only the worker's last word matters, for credit
            if msg.type != p.CHUNK:
                hub.table.finish(job)
                hub.after_credit(worker)
                hub.after_cancel(job)
            return
        if msg.type == p.CHUNK:
            job.streamed = True
        else:
            hub.table.finish(job)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request %s %s from worker %s", job.rid, p.TYPE_NAMES[msg.type],
                          worker.worker_id)
        hub.send_client(route, frames)  # on failure the client's jobs are cancelled there
        if msg.type != p.CHUNK:
            hub.after_credit(worker)

    def _on_chunks(self, worker: WorkerState, route: bytes, msg: p.Message,
                   frames: list) -> None:
        """One step's deltas for several of a client's requests: forwarded as one message if
        any of them is still live there (each one is marked as having streamed)."""
        live = False
        for rid in msg.header["ids"]:
            job = self.hub.table.jobs.get((route, rid))
            if job is not None and job.worker is worker and not job.cancelled:
                job.streamed = live = True
        if live:
            self.hub.send_client(route, frames)

    def _on_heartbeat(self, worker: WorkerState, route: bytes, msg: p.Message,
                      frames: list) -> None:
        if isinstance(stats := msg.header.get("stats"), dict):
            worker.stats = stats

    def _on_drain(self, worker: WorkerState, route: bytes, msg: p.Message,
                  frames: list) -> None:
        self.hub.stop_routing(worker, "worker asked")

    def _on_disconnect(self, worker: WorkerState, route: bytes, msg: p.Message,
                       frames: list) -> None:
        reason = msg.header.get("reason", "no reason")
        if not worker.inflight:
            log.info("worker left id=%s (%s)", worker.worker_id, reason)
            self.hub.table.remove_worker(worker)
        else:
            self.hub.purge(worker, f"disconnected ({reason})")
