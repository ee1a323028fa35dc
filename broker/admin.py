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
from collections.abc import Callable
from typing import Any

from zeroserve import protocol as p
from zeroserve.broker.hub import Hub

STATE_CHANGING = frozenset({"drain"})


def _workers(hub: Hub, msg: p.Message, now: float) -> tuple[Any, str]:
    table = hub.table
    return {"workers": [w.row(now) for w in table.workers.values()], **table.stats()}, ""


def _stats(hub: Hub, msg: p.Message, now: float) -> tuple[Any, str]:
    return {**hub.table.stats(), **hub.counts, "backlog": len(hub.outbox)}, ""


def _drain(hub: Hub, msg: p.Message, now: float) -> tuple[Any, str]:
    worker = hub.table.find_by_id(str(msg.header.get("worker_id")))
    if worker is None:
        return None, "no such worker"
    hub.drain(worker, "admin request")
    return worker.row(now), ""


OPS: dict[str, Callable[[Hub, p.Message, float], tuple[Any, str]]] = {
    "workers": _workers, "stats": _stats, "drain": _drain}


def run_op(hub: Hub, msg: p.Message, privileged: bool) -> tuple[Any, str]:
    """(result, "") or (None, error message) for one ADMIN message."""
    op = msg.header.get("op")
    if op in STATE_CHANGING and not privileged:
        return None, f"{op} is an admin op: send it to the broker's admin endpoint"
    run = OPS.get(op) if isinstance(op, str) else None
    return run(hub, msg, time.time()) if run else (None, f"unknown admin op {op!r}")


class Admin:
    """The admin ROUTER's handlers, one per message type (`handlers`), over the hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.handlers: dict[int, Callable[[p.Message], list | None]] = {
            p.HEARTBEAT: lambda msg: hub.beat, p.ADMIN: self._on_admin,
            p.DISCONNECT: lambda msg: None}

    def on_message(self, frames: list[bytes]) -> None:
        """One message on the admin endpoint; the answer (if any) goes back to its peer."""
        hub = self.hub
        peer, message = frames[0], frames[1:]  # the ROUTER's identity frame, the message
        try:
            msg = p.decode(message, hub.cfg.sockets.max_message_bytes)
        except p.ProtocolError as exc:
            hub.counts["bad_frames"] += 1
            answer: list | None = p.error("*", p.BAD_REQUEST, str(exc))
        else:
            handler = self.handlers.get(msg.type)
            rid = msg.header.get("id") if isinstance(msg.header.get("id"), str) else "*"
            answer = handler(msg) if handler else p.error(
                rid, p.BAD_REQUEST, "the admin endpoint takes ADMIN only")
        if answer is not None:
            hub.send_quiet(hub.admin, [peer, *answer])

    def _on_admin(self, msg: p.Message) -> list:
        result, error = run_op(self.hub, msg, privileged=True)
        rid = msg.header["id"]
        return p.error(rid, p.BAD_REQUEST, error) if error else p.end(rid, result)
