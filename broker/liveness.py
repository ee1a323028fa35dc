"""Local workers' processes, watched through pidfds: a worker on this host that exits is purged
at once, not after its heartbeats go missing (remote workers stay on heartbeats).

A READY quotes the worker's pid, boot id and process start time (procs.identity), but a quote
proves nothing: any local user can read another process's from /proc. The broker watches a
process only when the kernel vouches for it: the READY came over an ipc connection whose peer
(SO_PEERCRED, `peer_pid`) is the pid it quotes, and that pid's start time matches. A tcp
peer, a worker in another pid namespace, or a quote of someone else's pid is on heartbeats
only, and never counts as the same process as a live registration. The broker polls the
pidfds beside its sockets; one turns readable when its process ends (killed, crashed or
exited), even before its parent reaps it. The broker never signals a process: a worker
purged for silence (SIGSTOP, a hang) that comes back finds itself unknown, drops what it was
doing and registers again (workers/links.py); a hung engine ends itself
(--progress-timeout-s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from typing import Any

import psutil

from zeroserve.procs import boot_id

log = logging.getLogger("zeroserve.broker")


def peer_pid(fd: int) -> int | None:
    """The pid of the process at the other end of the unix socket `fd` (SO_PEERCRED), or
    None: not a unix socket, or gone."""
    if fd < 0:
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family != socket.AF_UNIX:
                return None
            pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return None
    return pid or None


class PidWatch:
    """pidfd -> the worker identity it watches; one pidfd per process."""

    def __init__(self) -> None:
        self.identities: dict[int, bytes] = {}
        self._fd_of_pid: dict[int, int] = {}
        self._boot = boot_id()

    def watch(self, identity: bytes, info: dict[str, Any]) -> int | None:
        """A pidfd to poll for this worker's process (None: not a process of this host, or
        watched already). The caller has checked that the kernel vouches for the pid; a
        process that registers again (a new connection) moves its watch to the new id."""
        pid, started = info.get("pid"), info.get("started")
        if (info.get("boot_id") != self._boot or not isinstance(pid, int)
                or isinstance(pid, bool) or not isinstance(started, int | float)):
            return None
        old = self._fd_of_pid.get(pid)
        if old is not None:
            self.identities[old] = identity
            return None
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):  # gone already, or no pidfd on this kernel
            return None
        try:
            same = abs(psutil.Process(pid).create_time() - started) < 0.01
        except psutil.Error:
            same = False
        if not same:
            os.close(fd)
            return None
        self.identities[fd] = identity
        self._fd_of_pid[pid] = fd
        return fd

    def ended(self, fd: int) -> bytes | None:
        """The process behind `fd` ended: forget the watch, return whose it was."""
        identity = self.identities.pop(fd, None)
        for pid, f in list(self._fd_of_pid.items()):
            if f == fd:
                del self._fd_of_pid[pid]
        with contextlib.suppress(OSError):
            os.close(fd)
        return identity

    def close(self) -> None:
        for fd in list(self.identities):
            self.ended(fd)
