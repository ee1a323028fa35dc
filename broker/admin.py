"""ADMIN ops and the admin endpoint: who may look, and who may change what the broker does.

    op        where                                      answers
    workers   frontend or admin endpoint (read-only)     the worker table and queue figures
    stats     frontend or admin endpoint (read-only)     queue figures and the broker's counts
    drain     admin endpoint only (changes state)        the drained worker's row

The admin endpoint is a third ROUTER of the broker: by default an ipc path in the private
runtime directory (only this user reaches it); with CURVE keys it admits admin keys only
(ZAP domain "admin"). Messages in: ADMIN, HEARTBEAT (echoed), DISCONNECT (ignored).
"""

from __future__ import annotations

import time
from typing import Any

from zeroserve import protocol as p
from zeroserve.broker.hub import Hub

STATE_CHANGING = frozenset({"drain"})


def run_op(broker: Hub, msg: p.Message, privileged: bool) -> tuple[Any, str]:
    """(result, "") or (None, error message) for one ADMIN message."""
    op, now, table = msg.header.get("op"), time.time(), broker.table
    if op in STATE_CHANGING and not privileged:
        return None, f"{op} is an admin op: send it to the broker's admin endpoint"
    if op == "workers":
        return {"workers": [w.row(now) for w in table.workers.values()], **table.stats()}, ""
    if op == "stats":
        return {**table.stats(), **broker.counts, "backlog": len(broker.outbox)}, ""
    if op == "drain":
        worker = table.find_by_id(str(msg.header.get("worker_id")))
        if worker is None:
            return None, "no such worker"
        broker.drain(worker, "admin request")
        return worker.row(now), ""
    return None, f"unknown admin op {op!r}"


def on_admin_socket(broker: Hub, frames: list[bytes]) -> None:
    """One message on the admin endpoint."""
    peer, message = frames[0], frames[1:]  # the ROUTER's identity frame, then the message

    def reply(answer: list) -> None:
        broker.send_quiet(broker.admin, [peer, *answer])

    try:
        msg = p.decode(message, broker.cfg.sockets.max_message_bytes)
    except p.ProtocolError as exc:
        broker.counts["bad_frames"] += 1
        reply(p.error("*", p.BAD_REQUEST, str(exc)))
        return
    if msg.type == p.HEARTBEAT:
        reply(broker.beat)
    elif msg.type == p.ADMIN:
        result, error = run_op(broker, msg, privileged=True)
        rid = msg.header["id"]
        reply(p.error(rid, p.BAD_REQUEST, error) if error else p.end(rid, result))
    elif msg.type != p.DISCONNECT:
        rid = msg.header.get("id") if isinstance(msg.header.get("id"), str) else "*"
        reply(p.error(rid, p.BAD_REQUEST, "the admin endpoint takes ADMIN only"))
