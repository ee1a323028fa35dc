"""The pipeline `zeroserve chaos` runs its faults on, and what it leaves behind.

`Stack` starts (and starts again) `brokers` brokers (`b0`, `b1`: all active, every worker
registered with each, clients spreading over them), two tiny LLM workers `l1`, `l2`, an echo
worker and on demand a gateway, on ipc endpoints in a temporary directory, each peer
heartbeating every 0.25 s; it asks the brokers' table who is registered and who is busy. The helpers
measure what a stretch of the run left behind: stale shared-memory files of dead pids, and
the broker's RSS and fd growth.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from zeroserve.procs import spawn, stop

HEARTBEAT = ["--heartbeat-interval-s", "0.25"]


class Stack:
    """The pipeline under test: processes by name, started again on demand."""

    def __init__(self, root: Path, model: str, brokers: int = 2) -> None:
        self.brokers = [f"b{i}" for i in range(brokers)]
        fronts, backs, admins = ([f"ipc://{root}/{n}{i}.sock" for i in range(brokers)]
                                 for n in "fba")
        self.fronts, self.admins = fronts, admins
        self.front, self.back, self.admin = ",".join(fronts), ",".join(backs), admins[0]
        self.logs = root
        llm = ["--engine", "llm", "--model", model, "--served-name", "tiny", "--dtype",
               "float32", "--max-model-len", "512"]
        self.args = {
            **{b: ["--frontend", fronts[i], "--backend", backs[i], "--admin", admins[i],
                   "--max-message-mb", "32", *HEARTBEAT] for i, b in enumerate(self.brokers)},
            # each LLM worker pinned to its half of the cores, as deployed: unpinned, their
            # OpenMP threads spin against each other and a 3 ms step takes 300 ms
            **{w: ["--broker", self.back, "--worker-id", w, "--slot", str(i), "--slots", "2",
                   *llm, *HEARTBEAT] for i, w in enumerate(("l1", "l2"))},
            "echo": ["--broker", self.back, "--worker-id", "echo", "--no-pin",
                     "--step-delay-ms", "20", *HEARTBEAT],
            "gateway": ["--broker", self.front, "--port", str(free_port()), "--cache-mb", "0"],
        }
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.args['gateway'][3]}"

    def start(self, name: str) -> None:
        role = ("broker" if name in self.brokers else name if name == "gateway"
                else "worker")
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = spawn(role, self.args[name], stdout=log,
                                     stderr=subprocess.STDOUT)

    def client(self) -> Any:
        from zeroserve.client import AsyncClient

        # 0.5 s: a broker restart (seconds) fits in the SDK's failover budget (4 x 1.5 s)
        return AsyncClient(self.front, heartbeat_interval_s=0.5)

    async def workers(self, broker: int = 0) -> list[dict[str, Any]]:
        """One broker's worker table ([] while it does not answer)."""
        from zeroserve.client import AsyncClient

        async with AsyncClient(self.fronts[broker], heartbeat_interval_s=0.5) as c:
            with contextlib.suppress(Exception):
                return await c.workers()
        return []

    async def wait_workers(self, names: set[str], timeout_s: float = 120) -> None:
        """Until every broker lists these workers."""
        deadline = time.monotonic() + timeout_s
        for i in range(len(self.brokers)):
            while not names <= {w["worker_id"] for w in await self.workers(i)}:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers {sorted(names)} did not register with "
                                       f"{self.brokers[i]}")
                await asyncio.sleep(0.1)

    async def wait_gone(self, name: str, since: float) -> float:
        """ms from `since` until the broker's table no longer lists worker `name`."""
        while name in {w["worker_id"] for w in await self.workers()}:
            await asyncio.sleep(0.01)
        return (time.monotonic() - since) * 1000

    def close(self) -> None:
        for proc in self.procs.values():
            stop(proc, timeout_s=5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restart_after_exit(stack: Stack, name: str) -> None:
    stack.procs[name].wait(60)
    stack.start(name)


async def idle_within(stack: Stack, timeout_s: float) -> tuple[float | None, str]:
    """Seconds until every worker is back to nothing running (the cut streams were cancelled
    in the engine), or None past `timeout_s`, with who was still busy then."""
    t0 = time.monotonic()
    busy = "no worker registered"
    while time.monotonic() - t0 < timeout_s:
        rows = await stack.workers()
        if rows and all(w["in_flight"] == 0 and not w["stats"].get("running") for w in rows):
            return time.monotonic() - t0, ""
        busy = ", ".join(f"{w['worker_id']}: {w['in_flight']} in flight, "
                         f"{w['stats'].get('running')} running" for w in rows) or busy
        await asyncio.sleep(0.1)
    return None, f"still busy after {timeout_s:.0f} s: {busy}"


def leftovers(stack: Stack) -> dict[str, Any]:
    from zeroserve.arena import SHM_DIR, prefix

    stale = [f for f in os.listdir(SHM_DIR) if f.startswith(prefix() + "-")
             and not psutil.pid_exists(int(f.split("-")[-2]))]
    broker = psutil.Process(stack.procs["b0"].pid)
    return {"stale_shm_files": len(stale), "broker_pid": broker.pid,
            "broker_rss_mib": broker.memory_info().rss >> 20, "broker_fds": broker.num_fds()}


def growth(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What a stretch of the run left: stale shm files, and the first broker's RSS and fd
    growth (None across its restart)."""
    same = before["broker_pid"] == after["broker_pid"]
    return {"stale_shm_files": after["stale_shm_files"],
            "broker_rss_growth_mib": after["broker_rss_mib"] - before["broker_rss_mib"]
            if same else None,
            "broker_fd_growth": after["broker_fds"] - before["broker_fds"] if same else None}


def acceptable(left: dict[str, Any]) -> bool:
    return (left["stale_shm_files"] == 0 and (left["broker_rss_growth_mib"] or 0) <= 64
            and (left["broker_fd_growth"] or 0) <= 16)
