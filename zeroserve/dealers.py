"""One DEALER per broker for the SDK's clients (client.py), with its socket monitor.

Connects: DEALER -> one broker frontend (its endpoint in ClientConfig.endpoints). The monitor
reports only disconnects: a local broker that exits is noticed at once, not after its
heartbeats go missing. `reconnect` opens a fresh socket on the same endpoint (a new identity
at the broker). The send, read and disconnected helpers are for the sync client's IO thread;
the async client awaits the same socket's calls itself.
"""

from __future__ import annotations

import contextlib
from typing import Any

import zmq

from zeroserve.client_core import ClientCore
from zeroserve.sockets import is_disconnect, make_socket


class Dealer:
    """One broker's DEALER and its socket monitor (a local broker's exit is seen at once)."""

    def __init__(self, ctx: zmq.Context, core: ClientCore, index: int) -> None:
        self.ctx, self.core, self.index = ctx, core, index
        self.endpoint = core.cfg.endpoints[index]
        self.sock, self.monitor = self._open()

    def _open(self) -> tuple[Any, Any]:
        sock = make_socket(self.ctx, zmq.DEALER, self.core.cfg.sockets)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        return sock, monitor

    def register(self, poller: zmq.Poller) -> None:
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)

    def send(self, frames: list[Any]) -> None:
        """Sync sockets only (the async client awaits its sends)."""
        with contextlib.suppress(zmq.ZMQError):  # closed under us: its requests fail over
            self.sock.send_multipart(frames, copy=False)

    def read(self) -> list[list[Any]]:
        """Sync sockets only: what has arrived, without waiting."""
        out = []
        for _ in range(1024):
            try:
                out.append(self.sock.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        return out

    def disconnected(self) -> bool:
        """Sync sockets only: whether the monitor saw the connection drop."""
        seen = False
        with contextlib.suppress(zmq.Again):
            while True:
                seen |= is_disconnect(self.monitor.recv_multipart(zmq.NOBLOCK))
        return seen

    def reconnect(self) -> None:
        self.close()
        self.sock, self.monitor = self._open()

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
