"""CURVE and ZAP for the broker's two sockets: who may connect, by public key and role.

With a key directory (keys.py) the broker's sockets are CURVE servers, and a ZAP handler
(pyzmq's ThreadAuthenticator, on an inproc socket of the broker's context) admits a peer only
if its public key is listed for the socket's domain: the frontend takes client and admin keys,
the backend worker keys, the admin endpoint admin keys only. A worker key used as a client, or
a client key used as a worker, is refused at the handshake: no message of theirs reaches the
broker.
"""

from __future__ import annotations

import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator

from zeroserve.keys import Allowlist, PeerKeys, allowlists, curve_server

log = logging.getLogger("zeroserve.broker")

DOMAINS = {"frontend": ("client", "admin"), "backend": ("worker",), "admin": ("admin",)}


def secure(ctx: zmq.Context, keys_dir: str, key_name: str, frontend: zmq.Socket,
           backend: zmq.Socket, admin: zmq.Socket) -> ThreadAuthenticator:
    """Make the three sockets CURVE servers (before bind) and start the ZAP handler."""
    keys = PeerKeys.load(keys_dir, key_name)
    allowed = allowlists(keys_dir)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("zeroserve.broker.zap"))
    auth.start()
    provider = Allowlist(allowed, DOMAINS)
    for domain in DOMAINS:
        auth.configure_curve_callback(domain, credentials_provider=provider)
    curve_server(frontend, keys, "frontend")
    curve_server(backend, keys, "backend")
    curve_server(admin, keys, "admin")
    log.info("CURVE on: %s", ", ".join(f"{d} admits {len(provider.allowed[d])} keys "
                                         f"({'/'.join(r)})" for d, r in DOMAINS.items()))
    return auth
