"""The broker's frontend: what clients send it, and what happens when a client leaves.

Messages in (on the frontend ROUTER, behind the client's identity): REQUEST, CANCEL,
HEARTBEAT (echoed), DISCONNECT, ADMIN (read-only ops). Replies go out through the broker's
`send_client` (a bounded backlog per client, outbox.py).

A REQUEST is dispatched at once to a worker with free credit, else queued within its client's
and tenant's share (table.py), else answered BUSY. A model no registered worker serves is
answered UNKNOWN_MODEL, but not in a new broker's first expiry_s: its workers are still
registering again, and the requests its clients resend after a restart wait for them.
A client that leaves (DISCONNECT, gone, silent past expiry, or too slow to read) has its
requests cancelled: queued ones are dropped, running ones are cancelled in their worker and
keep its credit until the worker confirms.
The same request sent again (the SDK resuming it) while that cancel is pending waits for it.
A copy marked `again` (the SDK sends everything again when this broker's epoch is new to it)
of a request that runs here already is ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from zeroserve import protocol as p
from zeroserve.broker import admin
from zeroserve.broker.hub import Hub
from zeroserve.broker.table import Job
from zeroserve.contract import DEADLINE

log = logging.getLogger("zeroserve.broker")


Handler = Callable[[bytes, p.Message, list[bytes]], None]


class Frontend:
    """The frontend ROUTER's handlers, one per message type (`handlers`), over the hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.handlers: dict[int, Handler] = {
            p.REQUEST: self.on_request, p.CANCEL: self._on_cancel,
            p.HEARTBEAT: self._on_heartbeat, p.DISCONNECT: self._on_disconnect,
            p.ADMIN: self._on_admin}

    def on_message(self, frames: list[bytes]) -> None:
        hub = self.hub
        client, message = frames[0], frames[1:]  # the ROUTER's identity frame, the message
        hub.clients[client] = time.monotonic()
        try:
            msg = p.decode(message, hub.cfg.sockets.max_message_bytes)
        except p.ProtocolError as exc:
            hub.bad_frame("frontend", client, exc)
            hub.send_client(client, p.error(p.rid_of(message), p.BAD_REQUEST, str(exc)))
            return
        handler = self.handlers.get(msg.type)
        if handler is not None:
            handler(client, msg, message)
            return
        rid = msg.header.get("id") if isinstance(msg.header.get("id"), str) else p.UNATTRIBUTED
        hub.send_client(client, p.error(rid, p.BAD_REQUEST,
                                        f"{p.TYPE_NAMES[msg.type]} is not accepted from clients"))

    def on_request(self, client: bytes, msg: p.Message, frames: list[bytes]) -> None:
        hub = self.hub
        rid, model = msg.header["id"], msg.header["model"]
        hub.counts["requests"] += 1
        same = hub.table.jobs.get((client, rid))
        if same is not None:
            if msg.header.get("again") and not same.cancelled:
                return  # sent again after a restart of ours, and it reached us the first time
            if same.cancelled and same.successor is None:  # sent again (resumed) while its
                same.successor = (msg, frames)  # worker cancels it: it goes once that is done
            else:
                hub.send_client(client, p.error(rid, p.BAD_REQUEST,
                                                f"request id {rid} is in flight"))
            return
        deadline = msg.header.get("deadline")
        if deadline is not None and not 0 < deadline < DEADLINE.hi:  # NaN too: it would
            hub.send_client(client, p.error(rid, p.BAD_REQUEST,  # unsort the expiry heap
                                            "deadline must be wall-clock seconds"))
            return
        left = deadline - time.time() if deadline else None
        if left is not None and left <= 0:
            hub.send_client(client, p.error(rid, p.TIMEOUT, "its deadline passed before it "
                                                            "reached the broker"))
            return
        now = time.monotonic()
        job = Job(client, rid, model, frames, now, msg.header.get("tenant", ""),
                  msg.header.get("trace", ""), msg.header.get("prefix") or [],
                  msg.header.get("priority", 0), now + left if left is not None else 0.0)
        worker = hub.table.pick_worker(model, job.prefix)
        if worker is not None:
            hub.table.add(job)
            hub.dispatch(job, worker)
            return
        settled = time.monotonic() - hub.born > hub.cfg.expiry_s  # all workers back
        if settled and hub.table.workers and not hub.table.serves(model) and (
            model not in hub.table.known_models
        ):
            hub.send_client(client, p.error(rid, p.UNKNOWN_MODEL, f"no worker serves {model!r}"))
            return
        why = hub.table.why_not_enqueue(job)
        if why is not None:
            hub.counts["busy"] += 1
            hub.send_client(client, p.error(rid, p.BUSY, why))
            return
        hub.table.add(job)
        hub.table.enqueue(job)

    def _on_cancel(self, client: bytes, msg: p.Message, frames: list[bytes]) -> None:
        hub, rid = self.hub, msg.header["id"]
        job = hub.table.jobs.get((client, rid))
        if job is None or job.cancelled:
            return  # already finished: the END crossed the CANCEL
        if job.worker is not None:
            hub.send_worker(job.worker, client, p.cancel(rid))
        elif hub.table.unqueue(job):
            hub.table.drop(job)
            hub.send_client(client, p.error(rid, p.CANCELLED, "cancelled while queued"))

    def _on_heartbeat(self, client: bytes, msg: p.Message, frames: list[bytes]) -> None:
        self.hub.send_client(client, self.hub.beat, droppable=True)

    def _on_disconnect(self, client: bytes, msg: p.Message, frames: list[bytes]) -> None:
        self.client_gone(client)

    def client_gone(self, client: bytes, why: str = "") -> None:
        """The client left: cancel its jobs, forget it. With `why` (silent or too slow:
        perhaps still there) each job gets an ERROR UNAVAILABLE saying so, so the client can
        resend instead of waiting forever. A job on a worker keeps its credit until the
        worker confirms the cancel."""
        hub = self.hub
        hub.clients.pop(client, None)
        jobs = hub.table.jobs_of_client(client)
        if why and jobs:
            log.info("client %s %s: cancelling %d requests", client.hex(), why, len(jobs))
        for job in jobs:
            if job.worker is not None:
                job.cancelled = True
                hub.send_worker(job.worker, client, p.cancel(job.rid))
            else:
                hub.table.unqueue(job)
                hub.table.drop(job)
        if why:
            hub.outbox.cut(client, {j.rid for j in jobs},
                           [p.error(j.rid, p.UNAVAILABLE, why) for j in jobs])
        else:
            hub.outbox.drop(client)

    def _on_admin(self, client: bytes, msg: p.Message, frames: list[bytes]) -> None:
        result, error = admin.run_op(self.hub, msg, privileged=False)
        rid = msg.header["id"]
        self.hub.send_client(client, p.error(rid, p.BAD_REQUEST, error) if error
                             else p.end(rid, result))
