"""`zeroserve up`: the whole pipeline as children of one foreground command.

Starts a broker, N workers (each pinned to its own slice of cores) and the HTTP gateway on
this deployment's endpoints, waits until the workers have registered, prints how to call them
(curl and the Python SDK), and on Ctrl-C or SIGTERM stops every process it started (workers
drain first).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from typing import Any

from zeroserve.config import default_endpoint
from zeroserve.logs import setup_logging
from zeroserve.procs import spawn, stop_all, stop_on_signals

log = logging.getLogger("zeroserve.up")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeroserve up", description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--engine", default="llm", choices=["echo", "llm"])
    ap.add_argument("--model", default="tiny", help="model directory or preset (tiny, small)")
    ap.add_argument("--instance", default=None)
    ap.add_argument("--frontend", default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--host", default="127.0.0.1", help="gateway HTTP host")
    ap.add_argument("--port", type=int, default=8000, help="gateway HTTP port")
    ap.add_argument("--no-gateway", action="store_true")
    ap.add_argument("--ready-timeout-s", type=float, default=600.0)
    ap.add_argument("--log-level", default="INFO")
    return ap


def wait_ready(endpoint: str, workers: int, timeout_s: float, procs: list[Any],
               stopping: Any = lambda: False) -> list[dict[str, Any]]:
    """The worker table once `workers` have registered; [] if they did not in time."""
    from zeroserve.client import Client

    deadline = time.monotonic() + timeout_s
    with Client(endpoint) as client:
        while time.monotonic() < deadline and not stopping():
            if any(p.poll() is not None for p in procs):
                return []
            try:
                rows = client.workers()
                if len(rows) >= workers:
                    return rows
            except Exception:
                pass
            time.sleep(0.2)
    return []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "up")
    frontend = args.frontend or default_endpoint("frontend", args.instance)
    backend = args.backend or default_endpoint("backend", args.instance)
    stopping = stop_on_signals()
    if args.engine == "llm":
        from zeroserve.models import PRESETS, ensure_built

        if args.model in PRESETS:
            ensure_built(args.model)  # once, with a progress bar, before the workers start
    broker = spawn("broker", ["--frontend", frontend, "--backend", backend,
                              "--log-level", args.log_level])
    workers = [
        spawn("worker", ["--broker", backend, "--engine", args.engine, "--model", args.model,
                         "--slot", str(i), "--slots", str(args.workers), "--device", args.device,
                         "--worker-id", f"worker-{i}", "--log-level", args.log_level])
        for i in range(args.workers)
    ]
    procs = [*workers, broker]
    if not args.no_gateway:
        procs.insert(0, spawn("gateway", ["--broker", frontend, "--host", args.host,
                                          "--port", str(args.port),
                                          "--log-level", args.log_level]))
    try:
        rows = wait_ready(frontend, args.workers, args.ready_timeout_s, procs, stopping)
        if not rows:
            log.error("pipeline did not come up")
            return 1
        model = rows[0]["models"][0]
        http = "" if args.no_gateway else f"""
Call it over HTTP (OpenAI-compatible):

    curl -s http://{args.host}:{args.port}/v1/completions -H 'content-type: application/json' \\
      -d '{{"model": "{model}", "prompt": "hello from zeroserve", "max_tokens": 16}}'
"""
        print(f"""
zeroserve is up: broker + {args.workers} {args.engine} worker(s){"" if args.no_gateway else
                                                               " + gateway"}.
Ctrl-C here stops everything.
{http}
Or from Python:

    from zeroserve import Client
    with Client("{frontend}") as c:
        print(c.generate("{model}", "hello from zeroserve").text)
""", flush=True)
        while not stopping():
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
        admin = default_endpoint("admin", args.instance)
        for endpoint in (frontend, backend, admin):  # a broker that was killed leaves its files
            if endpoint.startswith("ipc://"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint[len("ipc://"):])


if __name__ == "__main__":
    raise SystemExit(main())
