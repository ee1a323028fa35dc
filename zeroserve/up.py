"""`zeroserve up`: the whole pipeline as children of one foreground command.

Starts a broker and N workers (each pinned to its own slice of cores) on this deployment's ipc
endpoints, waits until the workers have registered, prints how to call them, and on Ctrl-C or
SIGTERM stops every process it started (workers drain first).
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from typing import Any

from zeroserve.config import default_endpoint
from zeroserve.logs import setup_logging
from zeroserve.procs import spawn, stop_all

log = logging.getLogger("zeroserve.up")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeroserve up", description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engine", default="echo", choices=["echo", "llm"])
    ap.add_argument("--model", default="echo")
    ap.add_argument("--instance", default=None)
    ap.add_argument("--frontend", default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ready-timeout-s", type=float, default=600.0)
    ap.add_argument("--log-level", default="INFO")
    return ap


def wait_ready(endpoint: str, workers: int, timeout_s: float, procs: list[Any],
               stopping: Any = lambda: False) -> bool:
    from zeroserve.client import Client

    deadline = time.monotonic() + timeout_s
    with Client(endpoint) as client:
        while time.monotonic() < deadline and not stopping():
            if any(p.poll() is not None for p in procs):
                return False
            try:
                if len(client.workers()) >= workers:
                    return True
            except Exception:
                pass
            time.sleep(0.2)
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "up")
    frontend = args.frontend or default_endpoint("frontend", args.instance)
    backend = args.backend or default_endpoint("backend", args.instance)
    stopping = False

    def on_signal(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    broker = spawn("broker", ["--frontend", frontend, "--backend", backend,
                              "--log-level", args.log_level])
    workers = [
        spawn("worker", ["--broker", backend, "--engine", args.engine, "--model", args.model,
                         "--slot", str(i), "--slots", str(args.workers), "--device", args.device,
                         "--worker-id", f"worker-{i}", "--log-level", args.log_level])
        for i in range(args.workers)
    ]
    procs = [*workers, broker]
    try:
        if not wait_ready(frontend, args.workers, args.ready_timeout_s, procs, lambda: stopping):
            log.error("pipeline did not come up")
            return 1
        print(f"""
zeroserve is up: broker + {args.workers} {args.engine} workers.
Call it from Python (Ctrl-C here stops everything):

    from zeroserve import Client
    with Client("{frontend}") as c:
        print(c.generate("{args.model}", "hello from zeroserve").text)
""", flush=True)
        while not stopping:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                log.error("a child exited (pid %d, code %s): stopping", dead[0].pid,
                          dead[0].returncode)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        log.info("stopping %d processes", len(procs))
        stop_all(procs)


if __name__ == "__main__":
    raise SystemExit(main())
