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

from zeroserve import protocol as p
from zeroserve.broker import admin
from zeroserve.broker.hub import Hub
from zeroserve.broker.table import Job
from zeroserve.contract import DEADLINE

log = logging.getLogger("zeroserve.broker")


def on_message(broker: Hub, frames: list[bytes]) -> None:
    client, message = frames[0], frames[1:]  # the ROUTER's identity frame, then the message
    broker.clients[client] = time.monotonic()
    try:
        msg = p.decode(message, broker.cfg.sockets.max_message_bytes)
    except p.ProtocolError as exc:
        broker.bad_frame("frontend", client, exc)
        broker.send_client(client, p.error(p.rid_of(message), p.BAD_REQUEST, str(exc)))
        return
    t = msg.type
    if t == p.REQUEST:
        on_request(broker, client, msg, message)
    elif t == p.CANCEL:
        _on_cancel(broker, client, msg.header["id"])
    elif t == p.HEARTBEAT:
        broker.send_client(client, broker.beat, droppable=True)
    elif t == p.DISCONNECT:
        client_gone(broker, client)
    elif t == p.ADMIN:
        _on_admin(broker, client, msg)
    else:
        rid = msg.header.get("id") if isinstance(msg.header.get("id"), str) else p.UNATTRIBUTED
        broker.send_client(client, p.error(rid, p.BAD_REQUEST,
                                           f"{p.TYPE_NAMES[t]} is not accepted from clients"))


def on_request(broker: Hub, client: bytes, msg: p.Message, frames: list[bytes]) -> None:
    rid, model = msg.header["id"], msg.header["model"]
    broker.counts["requests"] += 1
    same = broker.table.jobs.get((client, rid))
    if same is not None:
        if msg.header.get("again") and not same.cancelled:
            return  # sent again after a restart of ours, and it reached us the first time
        if same.cancelled and same.successor is None:  # sent again (resumed) while its
            same.successor = (msg, frames)  # worker cancels it: it goes once that is done
        else:
            broker.send_client(client, p.error(rid, p.BAD_REQUEST,
                                               f"request id {rid} is in flight"))
        return
    deadline = msg.header.get("deadline")
    if deadline is not None and not 0 < deadline < DEADLINE.hi:  # NaN too: it would unsort
        broker.send_client(client, p.error(rid, p.BAD_REQUEST,  # the expiry heap
                                           "deadline must be wall-clock seconds"))
        return
    left = deadline - time.time() if deadline else None
    if left is not None and left <= 0:
        broker.send_client(client, p.error(rid, p.TIMEOUT, "its deadline passed before it "
                                                           "reached the broker"))
        return
    now = time.monotonic()
    job = Job(client, rid, model, frames, now, msg.header.get("tenant", ""),
              msg.header.get("trace", ""), msg.header.get("prefix") or [],
              msg.header.get("priority", 0), now + left if left is not None else 0.0)
    worker = broker.table.pick_worker(model, job.prefix)
    if worker is not None:
        broker.table.add(job)
        broker.dispatch(job, worker)
        return
    settled = time.monotonic() - broker.born > broker.cfg.expiry_s  # all workers back
    if settled and broker.table.workers and not broker.table.serves(model) and (
        model not in broker.table.known_models
    ):
        broker.send_client(client, p.error(rid, p.UNKNOWN_MODEL, f"no worker serves {model!r}"))
        return
    why = broker.table.why_not_enqueue(job)
    if why is not None:
        broker.counts["busy"] += 1
        broker.send_client(client, p.error(rid, p.BUSY, why))
        return
    broker.table.add(job)
    broker.table.enqueue(job)


def _on_cancel(broker: Hub, client: bytes, rid: str) -> None:
    job = broker.table.jobs.get((client, rid))
    if job is None or job.cancelled:
        return  # already finished: the END crossed the CANCEL
    if job.worker is not None:
        broker.send_worker(job.worker, client, p.cancel(rid))
    elif broker.table.unqueue(job):
        broker.table.drop(job)
        broker.send_client(client, p.error(rid, p.CANCELLED, "cancelled while queued"))


def client_gone(broker: Hub, client: bytes, why: str = "") -> None:
    """The client left: cancel its jobs, forget it. With `why` (silent or too slow: perhaps
    still there) each job gets an ERROR UNAVAILABLE saying so, so the client can resend
    instead of waiting forever. A job on a worker keeps its credit until the worker
    confirms the cancel."""
    broker.clients.pop(client, None)
    jobs = broker.table.jobs_of_client(client)
    if why and jobs:
        log.info("client %s %s: cancelling %d requests", client.hex(), why, len(jobs))
    for job in jobs:
        if job.worker is not None:
            job.cancelled = True
            broker.send_worker(job.worker, client, p.cancel(job.rid))
        else:
            broker.table.unqueue(job)
            broker.table.drop(job)
    if why:
        broker.outbox.cut(client, {j.rid for j in jobs},
                          [p.error(j.rid, p.UNAVAILABLE, why) for j in jobs])
    else:
        broker.outbox.drop(client)


def _on_admin(broker: Hub, client: bytes, msg: p.Message) -> None:
    result, error = admin.run_op(broker, msg, privileged=False)
    rid = msg.header["id"]
    broker.send_client(client, p.error(rid, p.BAD_REQUEST, error) if error
                       else p.end(rid, result))
