"""Socket construction: every option is set before bind/connect, in one place.

ZeroMQ applies high-water marks and MAXMSGSIZE only to connections made after they are set,
so a socket is configured fully here and only then bound or connected by the caller.
"""

from __future__ import annotations

import zmq

from zeroserve.config import SocketConfig


def make_socket(
    ctx: zmq.Context,
    kind: int,
    cfg: SocketConfig,
    *,
    identity: bytes | None = None,
    router_mandatory: bool = False,
) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, cfg.linger_ms)
    sock.setsockopt(zmq.SNDHWM, cfg.hwm)
    sock.setsockopt(zmq.RCVHWM, cfg.hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if router_mandatory:
        # A reply to a peer that has gone raises EHOSTUNREACH instead of vanishing.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    return sock


def prepare_ipc(endpoint: str) -> None:
    """Make the directory of an ipc endpoint so bind() does not fail on a fresh host."""
    if endpoint.startswith("ipc://"):
        import os

        path = endpoint[len("ipc://"):]
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
