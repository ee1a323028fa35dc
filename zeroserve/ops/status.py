"""One table of every worker slot: supervisord's view joined with the broker's worker table."""

from __future__ import annotations

import argparse
import json
from typing import Any

from zeroserve.client import Client
from zeroserve.config import default_endpoint
from zeroserve.ops import supervisor

CRASH_LOOP_RESTARTS = 3
COLUMNS = ("slot", "pid", "state", "device", "cpus", "model", "capacity", "in_flight",
           "running", "waiting", "kv_tokens", "prefix_hit", "preempted", "tok_s", "uptime_s",
           "restarts")


def collect(rpc: Any, client: Client) -> list[dict[str, Any]]:
    try:
        table = {w["worker_id"]: w for w in client.workers()}
    except Exception:  # broker down: still show what supervisord knows
        table = {}
    rows = []
    for slot in supervisor.slots(rpc):
        w = table.get(f"worker-{slot.slot}", {})
        stats = w.get("stats") or {}
        uptime = w.get("uptime_s") or slot.uptime_s
        restarts = supervisor.restarts(slot.slot)
        state = slot.state
        if w.get("draining"):
            state = "DRAINING"
        elif slot.state == "RUNNING" and not w:
            state = "LOADING"
        rows.append({
            "slot": slot.slot, "pid": slot.pid or None, "state": state,
            "device": w.get("device"), "cpus": ",".join(map(str, w.get("cpus") or [])) or None,
            "model": ",".join(w.get("models") or []) or None, "capacity": w.get("capacity"),
            "in_flight": w.get("in_flight"),
            "running": stats.get("running"), "waiting": stats.get("waiting"),
            "kv_tokens": f"{stats['kv_tokens_used']}/{stats['kv_tokens']}"
            if "kv_tokens" in stats else None,
            "prefix_hit": f"{stats['prefix_cache_hit_rate']:.0%}"
            if "prefix_cache_hit_rate" in stats else None,
            "preempted": stats.get("preemptions"),
            "tok_s": round(stats.get("generated_tokens", 0) / uptime, 1) if uptime else None,
            "uptime_s": round(uptime) if uptime else None, "restarts": restarts,
            "served": w.get("served"),
            "crash_loop": restarts >= CRASH_LOOP_RESTARTS or slot.state in ("BACKOFF", "FATAL"),
        })
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c) if r.get(c) is not None else "-"))
                               for r in rows)) if rows else len(c) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS)]
    for r in rows:
        line = "  ".join(str(r.get(c) if r.get(c) is not None else "-").ljust(widths[c])
                         for c in COLUMNS)
        lines.append(line + ("  <- crash loop?" if r["crash_loop"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="status", description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--socket", default=None, help="supervisord unix socket")
    ap.add_argument("--broker", default=None, help="broker frontend endpoint")
    args = ap.parse_args(argv)
    with Client(args.broker or default_endpoint("frontend")) as client:
        rows = collect(supervisor.connect(args.socket), client)
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0
