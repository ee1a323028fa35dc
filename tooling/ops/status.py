"""One table of every worker: supervisord's slots joined with the broker's worker table, and
the broker's other workers (or, without supervisord, the broker's table alone)."""

from __future__ import annotations

import argparse
import http.client
import json
import time
import xmlrpc.client
from typing import Any

from zeroserve.client import Client
from zeroserve.config import default_endpoint
from zeroserve.tooling.ops import supervisor

CRASH_LOOP_RESTARTS = 3
COLUMNS = ("slot", "pid", "state", "device", "cpus", "model", "capacity", "in_flight",
           "running", "waiting", "kv_tokens", "prefix_hit", "preempted", "late", "tok_s",
           "uptime_s", "restarts")


def _table(client: Client) -> dict[str, dict[str, Any]]:
    try:
        return {w["worker_id"]: w for w in client.workers()}
    except Exception:  # broker down: still show what supervisord knows
        return {}


def collect(rpc: Any, client: Client, window_s: float = 1.0) -> list[dict[str, Any]]:
    """A row per supervisord slot, then one per worker the broker knows that no slot runs
    (a `zeroserve up` or hand-run worker); without supervisord, the broker's table alone.
    tok_s is the rate over the last `window_s` (two reads of the table); 0: lifetime mean."""
    table = _table(client)
    if window_s > 0 and table:
        before = {k: (w.get("stats") or {}).get("generated_tokens", 0) for k, w in table.items()}
        t0 = time.monotonic()
        time.sleep(window_s)
        table = _table(client)
        elapsed = time.monotonic() - t0
        rates = {k: round(((w.get("stats") or {}).get("generated_tokens", 0)
                           - before.get(k, 0)) / elapsed, 1) for k, w in table.items()}
    else:
        rates = {}
    try:
        slots = supervisor.slots(rpc)
    except (OSError, xmlrpc.client.Error, http.client.HTTPException):  # no supervisord here
        slots = []
    rows = []
    for slot in slots:
        w = table.pop(f"worker-{slot.slot}", {})
        state = slot.state
        if w.get("draining"):
            state = "DRAINING"
        elif slot.state == "RUNNING" and not w:
            state = "LOADING"
        restarts = supervisor.restarts(slot.slot)
        rows.append({**_figures(w, w.get("uptime_s") or slot.uptime_s, rates), "slot": slot.slot,
                     "pid": slot.pid or None, "state": state, "restarts": restarts,
                     "crash_loop": restarts >= CRASH_LOOP_RESTARTS
                     or slot.state in ("BACKOFF", "FATAL")})
    for worker_id, w in sorted(table.items()):  # workers no slot of ours runs
        rows.append({**_figures(w, w.get("uptime_s"), rates), "slot": worker_id,
                     "pid": w.get("pid"), "state": "DRAINING" if w.get("draining") else "RUNNING",
                     "restarts": None, "crash_loop": False})
    return rows


def _figures(w: dict[str, Any], uptime: float | None, rates: dict[str, float]
             ) -> dict[str, Any]:
    stats = w.get("stats") or {}
    lifetime = round(stats.get("generated_tokens", 0) / uptime, 1) if uptime else None
    return {
        "device": w.get("device"), "cpus": ",".join(map(str, w.get("cpus") or [])) or None,
        "model": ",".join(w.get("models") or []) or None, "capacity": w.get("capacity"),
        "in_flight": w.get("in_flight"),
        "running": stats.get("running"), "waiting": stats.get("waiting"),
        "kv_tokens": f"{stats['kv_tokens_used']}/{stats['kv_tokens']}"
        if "kv_tokens" in stats else None,
        "prefix_hit": f"{stats['prefix_cache_hit_rate']:.0%}"
        if "prefix_cache_hit_rate" in stats else None,
        "preempted": stats.get("preemptions"),
        "late": stats.get("deadline_misses"),  # requests it stopped at their deadline
        "tok_s": rates.get(w.get("worker_id", ""), lifetime),
        "uptime_s": round(uptime) if uptime else None, "served": w.get("served"),
    }


def render(rows: list[dict[str, Any]]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c) if r.get(c) is not None else "-"))
                               for r in rows)) if rows else len(c) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS)]
    for r in rows:
        line = "  ".join(str(r.get(c) if r.get(c) is not None else "-").ljust(widths[c])
                         for c in COLUMNS)
        lines.append(line + ("  <- crash loop?" if r["crash_loop"] else ""))
    return "\n".join(lines)


def routing_line(table: dict[str, Any]) -> str:
    """How the broker routed generations: to their prefix's worker, spilled for load, cold."""
    r = table.get("routed") or {}
    return (f"routing {table.get('routing', '?')}: {r.get('affinity', 0)} to their prefix's "
            f"worker, {r.get('spilled', 0)} spilled for load, {r.get('cold', 0)} cold; "
            f"{table.get('prefix_index', 0)} prefixes indexed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="status", description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--socket", default=None, help="supervisord unix socket")
    ap.add_argument("--broker", default=None, help="broker frontend endpoint")
    ap.add_argument("--window-s", type=float, default=1.0,
                    help="tok/s over this window (0: the lifetime mean)")
    args = ap.parse_args(argv)
    with Client(args.broker or default_endpoint("frontend")) as client:
        rows = collect(supervisor.connect(args.socket), client, args.window_s)
        try:
            footer = "\n" + routing_line(client.admin("workers"))
        except Exception:  # broker down: the table alone
            footer = ""
    print(json.dumps(rows, indent=2) if args.json else render(rows) + footer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
