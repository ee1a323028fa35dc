"""`zeroserve up`: the whole pipeline as children of one foreground command.

Starts a broker (--brokers N: N brokers, all active, every worker registered with each and
the gateway spreading over them), N workers (each pinned to its own slice of cores) and the
HTTP gateway on this deployment's endpoints, waits until the workers have registered, and
prints how to call them (curl and the Python SDK). A child that exits is started again after
a backoff, as supervisord would (0.5 s doubling to 30 s; the count resets once it has run
30 s); the others keep serving meanwhile (a generation on a dead worker resumes on another).
A broker or gateway that keeps failing (5 quick exits in a row) stops the whole pipeline. On
Ctrl-C or SIGTERM the workers drain first (what they started finishes), then the gateway
stops, then the brokers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from zeroserve.config import GatewayConfig, WorkerConfig, default_endpoint
from zeroserve.logs import setup_logging
from zeroserve.procs import spawn, stop_all, stop_on_signals
from zeroserve.sockets import ipc_in_use

log = logging.getLogger("zeroserve.tooling.up")

STABLE_S = 30.0  # a child that ran this long starts its backoff over
MAX_QUICK_EXITS = 5


@dataclass
class Child:
    """One process `up` keeps running: started again, with backoff, whenever it exits."""

    name: str
    role: str
    args: list[str]
    proc: subprocess.Popen = field(init=False)
    started_at: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.proc = spawn(self.role, self.args)
        self.started_at = time.monotonic()

    def keep_up(self, now: float) -> bool:
        """Restart it if it exited, once its backoff is over; False once it keeps failing."""
        if self.restart_at is None:
            if self.proc.poll() is None:
                return True
            ran = now - self.started_at
            self.quick_exits = 0 if ran >= STABLE_S else self.quick_exits + 1
            if self.quick_exits >= MAX_QUICK_EXITS:
                log.error("%s exited %d times in a row within %.0f s of starting: giving up",
                          self.name, self.quick_exits, STABLE_S)
                return False
            delay = min(30.0, 0.5 * 2 ** self.quick_exits)
            log.warning("%s exited (pid %d, code %s) after %.1f s: restarting in %.1f s",
                        self.name, self.proc.pid, self.proc.returncode, ran, delay)
            self.restart_at = now + delay
        if now >= self.restart_at:
            self.restart_at = None
            self.start()
            log.info("%s restarted (pid %d)", self.name, self.proc.pid)
        return True


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeroserve up", description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--brokers", type=int, default=1, help="brokers, all active (2: no single "
                    "point of failure)")
    ap.add_argument("--engine", default="llm", choices=["echo", "llm"])
    ap.add_argument("--model", default="tiny", help="model directory or preset (tiny, small)")
    ap.add_argument("--instance", default=None)
    ap.add_argument("--frontend", default=None, help="comma-separated, one per broker")
    ap.add_argument("--backend", default=None, help="comma-separated, one per broker")
    ap.add_argument("--device", default=WorkerConfig.device)
    ap.add_argument("--host", default=GatewayConfig.host, help="gateway HTTP host")
    ap.add_argument("--port", type=int, default=GatewayConfig.port, help="gateway HTTP port")
    ap.add_argument("--no-gateway", action="store_true")
    ap.add_argument("--worker-flags", default="", metavar="'FLAGS'",
                    help="more worker flags, as one string (e.g. '--dtype float32 "
                         "--kv-cache-tokens 8192 --scheduling fcfs')")
    ap.add_argument("--gateway-flags", default="", metavar="'FLAGS'",
                    help="more gateway flags, as one string (e.g. '--api-keys-file keys.json "
                         "--rate-tpm 60000')")
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


def endpoints(given: str | None, role: str, brokers: int, instance: str | None) -> list[str]:
    """One endpoint of `role` per broker: as given (comma-separated), else the deployment's
    default for the first broker and `<role>-<i>` for the others."""
    if given:
        listed = [e for e in given.split(",") if e]
        if len(listed) != brokers:
            raise SystemExit(f"--{role} names {len(listed)} endpoints for {brokers} brokers")
        return listed
    return [default_endpoint(role if i == 0 else f"{role}-{i}", instance)
            for i in range(brokers)]


PARSERS = {"worker": "zeroserve.workers.worker", "gateway": "zeroserve.gateway.cli"}


def passed_through(ap: argparse.ArgumentParser, flags: str, role: str, base: list[str]
                   ) -> list[str]:
    """--worker-flags / --gateway-flags as arguments, checked by that role's own parser now
    (a typo fails here, not in a child that restarts in a loop)."""
    from importlib import import_module

    extra = shlex.split(flags)
    parser = import_module(PARSERS[role]).build_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            parser.parse_args([*base, *extra])
    except SystemExit:
        ap.error(f"--{role}-flags: {err.getvalue().strip().splitlines()[-1]}")
    return extra


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    setup_logging(args.log_level, "up")
    worker_extra = passed_through(ap, args.worker_flags, "worker", ["--broker", "-"])
    gateway_extra = passed_through(ap, args.gateway_flags, "gateway", [])
    fronts, backs, admins = (endpoints(given, role, args.brokers, args.instance) for given, role
                             in ((args.frontend, "frontend"), (args.backend, "backend"),
                                 (None, "admin")))
    frontend, backend = ",".join(fronts), ",".join(backs)
    if taken := [e for e in (*fronts, *backs, *admins) if ipc_in_use(e)]:
        log.error("zeroserve already runs at %s: stop it first, or start this one with "
                  "--instance NAME", ", ".join(taken))
        return 1
    stopping = stop_on_signals()
    if args.engine == "llm":
        from zeroserve.models import PRESETS, ensure_built

        if args.model in PRESETS:
            ensure_built(args.model)  # once, with a progress bar, before the workers start
    brokers = [Child(f"broker-{i}" if args.brokers > 1 else "broker", "broker", [
        "--frontend", fronts[i], "--backend", backs[i], "--admin", admins[i],
        "--log-level", args.log_level]) for i in range(args.brokers)]
    workers = [
        Child(f"worker-{i}", "worker", [
            "--broker", backend, "--engine", args.engine, "--model", args.model, "--slot",
            str(i), "--slots", str(args.workers), "--device", args.device, "--worker-id",
            f"worker-{i}", "--log-level", args.log_level, *worker_extra])
        for i in range(args.workers)
    ]
    gateway = [] if args.no_gateway else [
        Child("gateway", "gateway", ["--broker", frontend, "--host", args.host, "--port",
                                     str(args.port), "--log-level", args.log_level,
                                     *gateway_extra])]
    children = [*brokers, *workers, *gateway]
    try:
        rows = wait_ready(frontend, args.workers, args.ready_timeout_s,
                          [c.proc for c in children], stopping)
        if not rows:
            gone = [f"{c.name} (code {c.proc.returncode})" for c in children
                    if c.proc.poll() is not None]
            log.error("pipeline did not come up%s",
                      f": {', '.join(gone)} exited (its log above says why)" if gone
                      else " in time")
            return 1
        print(_banner(args, frontend, rows[0]["models"][0]), flush=True)
        while not stopping():
            now = time.monotonic()
            if not all([c.keep_up(now) for c in children]):  # every child gets its turn
                if any(c.quick_exits >= MAX_QUICK_EXITS for c in (*brokers, *gateway)):
                    return 1
                workers = [w for w in workers if w.quick_exits < MAX_QUICK_EXITS]
                if not workers:
                    return 1
                children = [*brokers, *workers, *gateway]
            time.sleep(0.1)
        return 0
    finally:
        log.info("stopping: workers drain first, then the gateway, then the broker")
        for group in (workers, gateway, brokers):
            stop_all([c.proc for c in group], timeout_s=30.0)
        for endpoint in (*fronts, *backs, *admins):  # a broker that was killed leaves its files
            if endpoint.startswith("ipc://") and not ipc_in_use(endpoint):  # not another's
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint[len("ipc://"):])


def _banner(args: argparse.Namespace, frontend: str, model: str) -> str:
    """What `up` prints once the pipeline serves: how to call it over HTTP and from Python."""
    http = "" if args.no_gateway else f"""
Call it over HTTP (OpenAI-compatible):

    curl -s http://{args.host}:{args.port}/v1/completions -H 'content-type: application/json' \\
      -d '{{"model": "{model}", "prompt": "hello from zeroserve", "max_tokens": 16}}'
"""
    return f"""
zeroserve is up: {args.brokers} broker(s) + {args.workers} {args.engine} worker(s){
    "" if args.no_gateway else " + gateway"}.
Ctrl-C here stops everything.
{http}
Or from Python:

    from zeroserve import Client
    with Client("{frontend}") as c:
        print(c.generate("{model}", "hello from zeroserve").text)
"""


if __name__ == "__main__":
    raise SystemExit(main())
