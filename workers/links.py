"""The worker's IO thread: one DEALER to each broker it serves, each with its own liveness.

Connects: DEALER -> every broker backend in WorkerConfig.broker (comma-separated: all active).
In (from each broker, behind a route frame): REQUEST, CANCEL, HEARTBEAT, DRAIN, DISCONNECT.
Out: READY, HEARTBEAT {stats} to each broker; what the engine thread produced (from an inproc
PAIR), each message to the broker its request came from; DRAIN and DISCONNECT to all.

A request's key inside the worker is (link byte + the client's route, request id): two brokers
may hand out the same client route, and a reply must go back through the broker that sent the
request. The worker's capacity is shared between its live brokers (each READY announces its
share; a broker lost or back makes the worker announce the new shares), so two brokers never
oversubscribe it; a broker counts once it answers. A broker that goes silent for heartbeat x
liveness, or whose connection drops (a socket monitor notices a local broker's exit at
once), is dropped: its requests are cancelled in the engine (nobody could receive them), and
the link reconnects after a backoff, then waits for the broker to be there.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

import zmq

from zeroserve import protocol as p
from zeroserve.config import WorkerConfig
from zeroserve.sockets import is_disconnect, make_socket
from zeroserve.workers.engine import Engine

log = logging.getLogger("zeroserve.worker")


class Host(Protocol):
    """What the IO thread needs of its worker (runtime.Worker)."""

    cfg: WorkerConfig
    ctx: zmq.Context
    engine: Engine
    worker_id: str
    replies_addr: str
    stop_io: threading.Event

    def ready_header(self) -> dict[str, Any]: ...

    def beat(self) -> dict[str, Any]: ...

    def broker_lost(self, tag: bytes) -> None: ...

    def check_progress(self, tell_all: Any, now: float) -> None: ...

    def on_broker(self, frames: list[bytes]) -> bool: ...


class Link:
    """One broker: its socket (None while waiting to reconnect) and when it was last heard."""

    def __init__(self, index: int, endpoint: str, interval_s: float) -> None:
        self.index, self.endpoint = index, endpoint
        self.tag = bytes([index])  # the first byte of every route key from this broker
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.expiry = 0.0
        self.backoff_s = interval_s
        self.retry_at = 0.0
        self.heard = False  # from this connection: until then it is not counted, nor dropped
        self.told = 0  # the capacity its broker was last told


class Links:
    def __init__(self, worker: Host) -> None:
        self.worker, self.cfg, self.ctx = worker, worker.cfg, worker.ctx
        interval = self.cfg.heartbeat_interval_s
        endpoints = [e for e in self.cfg.broker.split(",") if e]
        if len(endpoints) > 255:
            raise ValueError("a worker serves at most 255 brokers")
        self.links = [Link(i, e, interval) for i, e in enumerate(endpoints)]

    # -- shares --------------------------------------------------------------------------

    def share(self, also: Link | None = None) -> int:
        """This worker's capacity per live broker (heard from; and `also`), at least 1."""
        live = sum(link.heard or link is also for link in self.links) or 1
        return max(1, self.worker.engine.capacity // live)

    def _announce(self) -> None:
        """Every live broker whose share changed learns it: a READY from a registered worker
        updates its capacity."""
        for link in self.links:
            if link.heard and link.told != self.share(link):
                self._ready(link)

    def _ready(self, link: Link) -> None:
        assert link.sock is not None
        link.told = self.share(link)
        link.sock.send_multipart([b"", *p.encode(p.READY, {**self.worker.ready_header(),
                                                            "capacity": link.told})])

    # -- connecting ----------------------------------------------------------------------

    def _connect(self, link: Link) -> None:
        link.sock = make_socket(self.ctx, zmq.DEALER, self.cfg.sockets)
        link.monitor = link.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        link.sock.connect(link.endpoint)
        link.heard = False
        self._ready(link)  # queued until the broker is there; the others learn their smaller
        # shares once it answers (_read)

    def _drop(self, link: Link, why: str) -> None:
        """The broker is gone (or silent): cancel its requests, reconnect after a backoff."""
        log.warning("broker %s %s: reconnecting in %.1fs", link.endpoint, why, link.backoff_s)
        assert link.sock is not None and link.monitor is not None
        link.sock.disable_monitor()
        link.monitor.close(0)
        link.sock.close(0)
        link.sock = link.monitor = None
        link.heard = False
        self.worker.broker_lost(link.tag)
        link.retry_at = time.monotonic() + link.backoff_s
        link.backoff_s = min(link.backoff_s * 2, 8 * self.cfg.heartbeat_interval_s)
        self._announce()  # the live ones take over its share

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        pair = self.ctx.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.connect(self.worker.replies_addr)
        for link in self.links:
            self._connect(link)
        log.info("worker %s connected to %s: READY models=%s capacity=%d", self.worker.worker_id,
                 ",".join(link.endpoint for link in self.links),
                 ",".join(self.worker.engine.models), self.worker.engine.capacity)
        interval = self.cfg.heartbeat_interval_s
        next_beat = time.monotonic() + interval
        try:
            while not self.worker.stop_io.is_set():
                poller = zmq.Poller()
                poller.register(pair, zmq.POLLIN)
                live = [link for link in self.links if link.sock is not None]
                for link in live:
                    poller.register(link.sock, zmq.POLLIN)
                    poller.register(link.monitor, zmq.POLLIN)
                events = dict(poller.poll(min(100, interval * 1000)))
                now = time.monotonic()
                if pair in events:
                    self._forward(pair)
                for link in live:
                    if link.sock in events:
                        self._read(link, now)
                    if link.monitor in events and _disconnected(link.monitor):
                        link.expiry = 0.0  # a local broker's exit: now, not heartbeats later
                self.worker.check_progress(self._tell_all, now)
                if now >= next_beat:
                    next_beat = now + interval
                    self._tell_all(p.encode(p.HEARTBEAT, {"stats": self.worker.beat()}))
                for link in self.links:
                    # a link not heard from yet waits: ZeroMQ connects it when the broker is
                    # there (dropping it would only flap the others' shares)
                    if link.sock is not None and link.heard and now > link.expiry:
                        self._drop(link, "silent" if link.expiry else "disconnected")
                    elif link.sock is None and now >= link.retry_at:
                        self._connect(link)
        finally:
            for link in self.links:
                if link.sock is not None:
                    link.sock.disable_monitor()
                    link.monitor.close(0)  # type: ignore[union-attr]
                    link.sock.close(0)
            pair.close(0)

    def _tell_all(self, frames: list[Any]) -> None:
        """A message that belongs to no request, to every live broker."""
        for link in self.links:
            if link.sock is not None:
                link.sock.send_multipart([b"", *frames], copy=False)

    def _forward(self, pair: zmq.Socket) -> None:
        """What the engine thread produced: each message to the broker of its route key."""
        for _ in range(1024):
            try:
                frames = pair.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            key = frames[0].bytes
            if not key:
                self._tell_all(frames[1:])
                continue
            link = self.links[key[0]]
            if link.sock is not None:  # else its broker is gone: nobody could receive it
                link.sock.send_multipart([key[1:], *frames[1:]], copy=False)

    def _read(self, link: Link, now: float) -> None:
        link.expiry = now + self.cfg.expiry_s
        link.backoff_s = self.cfg.heartbeat_interval_s
        if not link.heard:
            link.heard = True
            self._announce()  # the others' shares shrink now that this broker is there
        for _ in range(1024):
            if link.sock is None:
                return
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = p.materialize(frames, 1 + p.HEAD_FRAMES)  # route, message
            frames[0] = link.tag + frames[0]
            try:
                if self.worker.on_broker(frames):
                    link.expiry = 0.0  # told to register again: reconnect now
                    self._drop(link, "asked us to register again")
                    link.retry_at = 0.0
                    return
            except Exception:
                log.exception("unexpected error handling a broker message")


def _disconnected(monitor: zmq.Socket) -> bool:
    """Drain a socket monitor; True if it reported a disconnect."""
    seen = False
    while True:
        try:
            seen |= is_disconnect(monitor.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return seen
