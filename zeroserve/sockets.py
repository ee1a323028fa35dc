"""Socket construction: every option is set before bind/connect, in one place.

ZeroMQ applies high-water marks and MAXMSGSIZE only to connections made after they are set,
so a socket is configured fully here and only then bound or connected by the caller.
Before an ipc endpoint is bound or connected, `private_ipc` makes sure its directory belongs to
this user and nobody else can enter it: another local user can then neither squat the path
(bind it first) nor talk to the socket.
"""

from __future__ import annotations

import contextlib
from typing import Any

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
    if cfg.curve is not None:
        from zeroserve.keys import curve_client

        curve_client(sock, cfg.curve)
    return sock


def recv_bounded(sock: zmq.Socket, max_frames: int, flags: int = 0) -> list[bytes]:
    """One whole message, keeping at most `max_frames` + 1 of its frames (the rest are read
    and dropped, so a message of a million empty frames cannot cost memory, and a decoder
    still sees that it had too many). ZeroMQ bounds each frame's size, never their count."""
    return recv_sourced(sock, max_frames, flags, source=False)[0]


def recv_sourced(sock: zmq.Socket, max_frames: int, flags: int = 0,
                 source: bool = True) -> tuple[list[bytes], int]:
    """recv_bounded, and the file descriptor of the connection the message came over
    (ZMQ_SRCFD: for an ipc peer, the kernel can say which process it is; -1 if unknown)."""
    frames: list[bytes] = []
    fd = -1
    while True:
        frame = sock.recv(flags if not frames else 0, copy=False)
        if source and not frames:
            with contextlib.suppress(zmq.ZMQError, AttributeError):
                fd = frame.get(zmq.SRCFD)
        if len(frames) <= max_frames:
            frames.append(frame.bytes)
        if not frame.more:
            return frames, fd


class InsecureError(RuntimeError):
    """A tcp endpoint without CURVE, and no --insecure."""


def check_transport(endpoints: tuple[str, ...] | list[str], curve: bool, insecure: bool,
                    log: Any) -> None:
    """tcp reaches other hosts: refuse it without CURVE unless the operator said --insecure
    (then warn once). ipc and inproc stay local (ipc in a private directory)."""
    tcp = [e for e in endpoints if e.startswith("tcp://")]
    if not tcp or curve:
        return
    if not insecure:
        raise InsecureError(f"{', '.join(tcp)}: tcp without CURVE keys reaches anyone on the "
                            "network; give --keys DIR (zeroserve keys generate), or "
                            "--insecure to run it open anyway")
    log.warning("INSECURE: %s without CURVE: any host that reaches it is trusted",
                ", ".join(tcp))


class EndpointInUseError(RuntimeError):
    """An ipc endpoint a live process already listens on (see ipc_in_use)."""


def ipc_in_use(endpoint: str) -> bool:
    """Whether a live process listens on an ipc endpoint's socket file. Binding it again
    would take the path over without a word (ZeroMQ unlinks the file first), leaving the
    first listener reachable by nobody new: a second broker started by mistake."""
    if not endpoint.startswith("ipc://"):
        return False
    import socket

    path = endpoint[len("ipc://"):]
    if path.startswith("@"):  # Linux's abstract namespace
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:  # no file, or a file nobody listens on (its process died)
            return False
    return True


class PrivateDirError(RuntimeError):
    """An ipc endpoint's directory that another user owns or can enter."""


def private_ipc(endpoint: str) -> None:
    """For an ipc endpoint: create its directory (mode 0700) if missing, then refuse it
    unless it is a real directory owned by this user with no access for group or others."""
    if not endpoint.startswith("ipc://"):
        return
    import os
    import stat

    parent = os.path.dirname(os.path.abspath(endpoint[len("ipc://"):]))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode):
        raise PrivateDirError(f"{parent}: not a directory (a symlink?): ipc endpoints need a "
                              "private directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PrivateDirError(
            f"{parent} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: ipc "
            f"endpoints need a directory owned by uid {os.geteuid()} with mode 700 "
            "(chmod 700 it, or pick another --instance or endpoint)")
    # and nobody else may swap it: every directory above it is this user's or root's, and
    # one that others may write to is sticky (they cannot rename what is not theirs)
    above = os.path.dirname(os.path.realpath(parent))
    while True:
        st = os.stat(above)
        if st.st_uid not in (0, os.geteuid()) or (st.st_mode & 0o022
                                                  and not st.st_mode & stat.S_ISVTX):
            raise PrivateDirError(
                f"{above} (above {parent}) is owned by uid {st.st_uid} with mode "
                f"{stat.S_IMODE(st.st_mode):o}: another user could swap the endpoint's "
                "directory; ipc endpoints need a path only this user or root can change")
        if above == os.path.dirname(above):
            return
        above = os.path.dirname(above)


def is_disconnect(frames: list[bytes]) -> bool:
    """A socket monitor's message (get_monitor_socket) says the connection dropped."""
    from zmq.utils.monitor import parse_monitor_message

    return parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED
