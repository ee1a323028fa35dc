"""What the broker's message handlers (frontend.py, backend.py, admin.py) may use of the
broker: its table, counters and outboxes, the sends it owns, and the worker lifecycle it
runs. broker.py implements it; the handlers see only this, so they never import the broker
back.
"""

from __future__ import annotations

from typing import Protocol

import zmq

from zeroserve import protocol as p
from zeroserve.broker.outbox import Outbox
from zeroserve.broker.table import Job, Table, WorkerState
from zeroserve.config import BrokerConfig


class Hub(Protocol):
    cfg: BrokerConfig
    table: Table  # workers, jobs and the queue: the one owner of every job
    clients: dict[bytes, float]  # client identity -> last time heard from
    counts: dict[str, int]  # requests, busy, timeout, lost, bad_frames, ...
    beat: list[bytes]  # this broker's HEARTBEAT (its epoch)
    born: float  # monotonic start: workers register again over the first expiry_s
    outbox: Outbox  # the frontend's bounded per-client backlogs
    admin: zmq.Socket  # the admin ROUTER

    def send_client(self, client: bytes, frames: list, droppable: bool = False) -> bool: ...

    def send_worker(self, worker: WorkerState, route: bytes, frames: list,
                    droppable: bool = False) -> bool: ...

    def send_quiet(self, sock: zmq.Socket, frames: list) -> None: ...

    def dispatch(self, job: Job, worker: WorkerState) -> None: ...

    def drain(self, worker: WorkerState, why: str) -> None: ...

    def bad_frame(self, side: str, peer: bytes, exc: Exception) -> None: ...

    def send_raw_backend(self, identity: bytes, frames: list) -> None: ...

    def register(self, identity: bytes, msg: p.Message, fd: int) -> None: ...

    def purge(self, worker: WorkerState, why: str) -> None: ...

    def stop_routing(self, worker: WorkerState, why: str) -> None: ...

    def after_credit(self, worker: WorkerState) -> None: ...

    def after_cancel(self, job: Job) -> None: ...
