"""Scale worker slots under supervisord without dropping a request.

Up: start the lowest stopped slots until N are up, and return once each is registered with
the broker and RUNNING in supervisord. Down: pick the highest running slots, ask
the broker to DRAIN each (no new work; in-flight requests finish; the worker then leaves and
exits 0), wait until the broker no longer lists them, then stop them in supervisord. A drain
goes to a broker's admin endpoint (ZEROSERVE_ADMIN, else admin-0.sock in the run dir; the
worker tells its other brokers itself): the frontend refuses it. Workers that are not chosen
are never touched. Running it twice with the same N changes nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from zeroserve.client import Client
from zeroserve.config import default_endpoint
from zeroserve.tooling.ops import supervisor

log = logging.getLogger("zeroserve.tooling.ops")


def scale(rpc: Any, client: Client, target: int, drain_timeout_s: float = 120.0,
          start_timeout_s: float = 120.0) -> dict[str, list[int]]:
    all_slots = supervisor.slots(rpc)
    if not 0 <= target <= len(all_slots):
        raise ValueError(f"target {target} outside 0..{len(all_slots)} slots")
    up = [s for s in all_slots if s.up]
    started, stopped = [], []
    if len(up) < target:
        for slot in [s for s in all_slots if not s.up][: target - len(up)]:
            log.info("starting slot %d", slot.slot)
            rpc.supervisor.startProcess(slot.name, False)
            started.append(slot.slot)
        _wait_registered(client, [f"worker-{n}" for n in started], start_timeout_s)
        _wait_running(rpc, started, start_timeout_s)
    elif len(up) > target:
        victims = sorted(up, key=lambda s: s.slot)[target:]
        with Client(admin_endpoint()) as admin:
            for slot in victims:
                log.info("draining slot %d", slot.slot)
                try:
                    admin.admin("drain", worker_id=f"worker-{slot.slot}")
                except Exception as exc:  # not registered (e.g. still loading): just stop it
                    log.info("slot %d not draining (%s): stopping it", slot.slot, exc)
        _wait_gone(client, [f"worker-{s.slot}" for s in victims], drain_timeout_s)
        for slot in victims:
            _stop(rpc, slot.name)
            stopped.append(slot.slot)
    return {"started": started, "stopped": stopped}


def admin_endpoint() -> str:
    return os.environ.get("ZEROSERVE_ADMIN") or f"ipc://{supervisor.run_dir()}/admin-0.sock"


def _registered(client: Client) -> set[str]:
    return {w["worker_id"] for w in client.workers()}


def _wait_registered(client: Client, ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not set(ids) <= _registered(client):
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers {ids} did not register in {timeout_s}s")
        time.sleep(0.2)


def _wait_running(rpc: Any, numbers: list[int], timeout_s: float) -> None:
    """Until supervisord says RUNNING too (a worker can register before its startsecs)."""
    deadline = time.monotonic() + timeout_s
    while any(s.state != "RUNNING" for s in supervisor.slots(rpc) if s.slot in numbers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"slots {numbers} registered but not RUNNING in {timeout_s}s")
        time.sleep(0.2)


def _wait_gone(client: Client, ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while set(ids) & _registered(client):
        if time.monotonic() > deadline:
            log.warning("drain of %s took over %ss: stopping anyway", ids, timeout_s)
            return
        time.sleep(0.2)


def _stop(rpc: Any, name: str) -> None:
    from xmlrpc.client import Fault

    try:
        rpc.supervisor.stopProcess(name, True)
    except Fault as exc:
        if "NOT_RUNNING" not in exc.faultString:
            raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scale_workers", description=__doc__.split("\n")[0])
    ap.add_argument("workers", type=int, help="how many worker slots should run")
    ap.add_argument("--socket", default=None, help="supervisord unix socket")
    ap.add_argument("--broker", default=None, help="broker frontend endpoint")
    ap.add_argument("--drain-timeout-s", type=float, default=120.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    with Client(args.broker or default_endpoint("frontend")) as client:
        done = scale(supervisor.connect(args.socket), client, args.workers,
                     args.drain_timeout_s)
    print(f"scaled to {args.workers}: started {done['started']}, stopped {done['stopped']}")
    return 0
