"""Child-process management for `zeroserve up`, benchmarks and tests: start, wait, reap.

Every child runs `python -m zeroserve.tooling.cli ROLE ...` in its own process group, so a stop can
signal the whole group; `stop_all` sends SIGTERM, waits, then SIGKILLs what is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def boot_id() -> str:
    """This boot of this host (a pid or a shared-memory file means something only within it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        import socket

        return socket.gethostname()


def identity() -> dict[str, object]:
    """What names this process to a peer on the same host: pid, boot and start time."""
    import psutil

    return {"pid": os.getpid(), "boot_id": boot_id(),
            "started": psutil.Process().create_time()}


def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_large_frees(threshold: int = 64 * 1024) -> bool:
    """Have glibc's malloc serve allocations of `threshold` bytes or more with mmap, so they go
    back to the system when freed. A process that holds other peers' messages for a moment (the
    broker) would otherwise keep a burst of large ones as heap for good: RSS that only grows.
    False where the C library is not glibc."""
    m_mmap_threshold = -3
    libc = _libc()
    return bool(getattr(libc, "mallopt", None) and libc.mallopt(m_mmap_threshold, threshold))


def trim_heap() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim): after a burst of
    many small messages (ZeroMQ allocates per frame), what was freed stops counting as RSS."""
    libc = _libc()
    return bool(getattr(libc, "malloc_trim", None) and libc.malloc_trim(0))


def spawn(role: str, args: Sequence[str], env: dict[str, str] | None = None,
          wrap: Sequence[str] = (), **popen: object) -> subprocess.Popen:
    """`zeroserve ROLE ARGS` in its own session, run under `wrap` (e.g. numactl) if given."""
    cmd = [*wrap, sys.executable, "-m", "zeroserve.tooling.cli", role, *args]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True,
                            **popen)  # type: ignore[call-overload]


def stop(proc: subprocess.Popen, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Signal a child's process group, wait for it, kill it if it will not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill(proc)
    return proc.returncode


def kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_on_signals() -> Callable[[], bool]:
    """SIGINT and SIGTERM set a flag instead of raising; returns the function that reads it."""
    flag = {"stop": False}

    def on_signal(*_: object) -> None:
        flag["stop"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return lambda: flag["stop"]


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so `finally` blocks reap the children a command started
    (by default a SIGTERM ends Python at once and leaves them running)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def stop_all(procs: Sequence[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """SIGTERM to each (its process group), then wait; kill what is left at the deadline.
    Callers stop in order (workers before the broker) by calling this once per group."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill(proc)


def give_memory_back() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim): after a huge
    request is decoded and dropped, its memory is free but stays with the process otherwise."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)
