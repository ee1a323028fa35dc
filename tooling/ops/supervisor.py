"""Talking to supervisord over XML-RPC on its unix socket (no inet server anywhere).

Worker slots are the processes of the `worker` group: `worker:worker-N` is slot N.
"""

from __future__ import annotations

import os
import re
import xmlrpc.client
from dataclasses import dataclass
from typing import Any

GROUP = "worker"
RUNNING_STATES = ("STARTING", "RUNNING", "BACKOFF")
SLOT_RE = re.compile(r"^worker-(\d+)$")


def run_dir() -> str:
    return os.environ.get("ZEROSERVE_RUN_DIR") or os.path.join(os.getcwd(), ".run")


def connect(socket_path: str | None = None) -> Any:
    from supervisor.xmlrpc import SupervisorTransport

    path = socket_path or os.path.join(run_dir(), "supervisor.sock")
    transport = SupervisorTransport(None, None, serverurl=f"unix://{path}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


@dataclass(frozen=True)
class Slot:
    slot: int
    name: str  # "worker:worker-N"
    state: str
    pid: int
    start: int
    now: int
    exitstatus: int
    spawnerr: str

    @property
    def up(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def uptime_s(self) -> int:
        return self.now - self.start if self.state == "RUNNING" else 0


def slots(rpc: Any) -> list[Slot]:
    """Every worker slot supervisord knows, in slot order."""
    out = []
    for info in rpc.supervisor.getAllProcessInfo():
        m = SLOT_RE.match(info["name"])
        if info["group"] != GROUP or not m:
            continue
        out.append(Slot(int(m.group(1)), f"{GROUP}:{info['name']}", info["statename"],
                        info["pid"], info["start"], info["now"], info["exitstatus"],
                        info.get("spawnerr", "")))
    return sorted(out, key=lambda s: s.slot)


def restarts(slot: int) -> int:
    """How often slot `slot` has been started beyond the first (its worker counts starts)."""
    try:
        with open(os.path.join(run_dir(), f"worker-{slot}.starts")) as fh:
            return max(0, int(fh.read().strip() or 0) - 1)
    except (OSError, ValueError):
        return 0
