"""`zeroserve chaos`: a fixed list of faults on a live pipeline of the tiny model, each checked
against a bound; a table (or --json) and a non-zero exit if any row misses its bound.

One pipeline for the whole run (chaos_stack.py), on ipc endpoints in a temporary directory:
two brokers, both active (`--brokers 1`: one), two LLM workers (`l1`, `l2`, the tiny preset)
and one echo worker (the test engine that accepts fault flags), every worker registered with
every broker. Peers heartbeat every 0.25 s. This harness plays supervisor: a process it
killed is started again. Rows:

  kill-1-of-2      kill -9 of the worker with most streams, mid-stream
  kill-all         kill -9 of both LLM workers, then start them again
  sigstop          SIGSTOP of the busiest worker (heartbeats stop; the broker purges it), then
                   SIGCONT: it comes back, drops its stale work and registers again
  engine-error     the echo engine raises in a step (fail_at): that batch fails, nothing hangs
  broker-kill      kill -9 of one of two brokers mid-stream (started again after the row)
  broker-restart   kill -9 of a broker mid-stream, then start it again on the same endpoints
  broker-rolling   each broker in turn stopped (SIGTERM) and started again, under load
  broker-sigstop   SIGSTOP of a broker for 3 s, then SIGCONT: streams route around it
  brokers-all-dead kill -9 of every broker, then one started again: all resume
  cut-100          100 streams cut by their clients at once
  abort-10-of-100  10 of 100 streams cancelled mid-stream, the other 90 finish
  oversized        a 64 MiB frame on a broker whose limit is 32 MiB, beside live streams
  drain            scale-down under load: one worker drained through the admin endpoint
  gateway-kill     kill -9 of the gateway with 16 HTTP streams open: their work is cancelled
                   in the workers, and the gateway started again serves
  slow-consumer    a client that asks for 8 long streams and never reads, beside live streams

Every LLM row runs 64 streams (32 greedy, 32 seeded, 48 tokens) and compares each with an
undisturbed run: `lost` counts streams that failed or differ. Columns: detect_ms (fault until
the broker dropped the worker), settle_ms (fault until every client had its result or error),
max_pause_ms (the longest wait between two chunks of any stream: what a client felt), and what
each row left behind (shared-memory files of dead pids, broker RSS and fd growth), and the
whole run too. Settle bounds scale with the undisturbed run's duration (a row that loses a
worker runs the rest on half the capacity). The rows themselves are in chaos_rows.py;
`--only ROW` (repeatable) runs some of them, `--repeat N` each N times: a soak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from zeroserve.procs import exit_on_sigterm
from zeroserve.tooling.chaos_rows import ROWS, STREAMS, Row, Run, streams
from zeroserve.tooling.chaos_stack import Stack, acceptable, growth, leftovers


async def _suite(stack: Stack, only: list[str], repeat: int) -> list[Row]:
    rows: list[Row] = []
    last = [leftovers(stack)]
    calm, _, calm_ms, calm_pause_ms = await streams(stack, STREAMS)
    run = Run(stack, calm, calm_ms, calm_pause_ms)
    for name in only:
        for _ in range(repeat):
            row = await ROWS[name](run)
            now = leftovers(stack)
            row.left = growth(last[0], now)
            row.ok = row.ok and acceptable(row.left)
            last[0] = now
            rows.append(row)
    return rows


def run(model: str, only: list[str] | None = None, repeat: int = 1,
        brokers: int = 2) -> dict[str, Any]:
    from zeroserve.models import PRESETS, ensure_built

    path = str(ensure_built(model)) if model in PRESETS else model
    os.environ["ZEROSERVE_INSTANCE"] = f"chaos-{os.getpid()}"  # its own ipc and shm names
    with tempfile.TemporaryDirectory(prefix="zs-chaos-") as tmp:
        stack = Stack(Path(tmp), path, brokers)
        try:
            for name in (*stack.brokers, "l1", "l2", "echo"):
                stack.start(name)
            asyncio.run(stack.wait_workers({"l1", "l2", "echo"}))
            before = leftovers(stack)
            rows = asyncio.run(_suite(stack, only or list(ROWS), repeat))
            left = growth(before, leftovers(stack))
        except BaseException:
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}")
            raise
        finally:
            stack.close()
    left_ok = acceptable(left)
    return {"rows": [asdict(r) for r in rows], "left_behind": left, "left_ok": left_ok,
            "ok": left_ok and all(r.ok for r in rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve chaos", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="model directory or preset")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", action="append", choices=list(ROWS), metavar="ROW",
                    help="run only this row (repeatable); default: every row in order")
    ap.add_argument("--repeat", type=int, default=1, help="run each row this many times "
                    "(a soak: `--only broker-restart --repeat 20`)")
    ap.add_argument("--brokers", type=int, default=2, choices=[1, 2],
                    help="brokers in the pipeline, all active (1: a restart is a restart)")
    args = ap.parse_args(argv)
    exit_on_sigterm()  # killed by a timeout: still stop the pipeline it started
    res = run(args.model, args.only, max(1, args.repeat), args.brokers)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        cols = ["fault", "requests", "completed", "errors", "lost", "detect_ms", "settle_ms",
                "max_pause_ms", "ok", "bound", "left"]
        print("  ".join(f"{c:>12}" if c not in ("bound", "left") else c for c in cols))
        for row in res["rows"]:
            print("  ".join(f"{row[c]!s:>12}" if c not in ("bound", "left") else str(row[c])
                            for c in cols))
        print(f"left behind: {res['left_behind']} ({'ok' if res['left_ok'] else 'TOO MUCH'})")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
