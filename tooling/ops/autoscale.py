"""An autoscaling policy loop on the broker's figures, in the spirit of Ray Serve's config.

Each tick reads ongoing requests (in flight on workers plus queued in the broker) and the
number of live workers. The wanted count is ceil(ongoing / target_ongoing_requests), held
within [min_workers, max_workers]. A scale up happens only after the wish has held for
upscale_delay_s, a scale down after downscale_delay_s, so a burst does not thrash workers.
`decide` is pure: the loop feeds it figures; tests feed it recorded ones.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("zeroserve.tooling.ops")


@dataclass(frozen=True)
class Policy:
    target_ongoing_requests: float = 8.0
    min_workers: int = 1
    max_workers: int = 4
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0


@dataclass(frozen=True)
class Figures:
    time_s: float
    workers: int
    ongoing: int  # in flight on workers + queued in the broker


@dataclass
class PolicyState:
    wish: int | None = None
    wish_since: float = 0.0


def wanted(policy: Policy, figures: Figures) -> int:
    raw = math.ceil(figures.ongoing / policy.target_ongoing_requests)
    return max(policy.min_workers, min(policy.max_workers, raw))


def decide(policy: Policy, state: PolicyState, figures: Figures) -> int | None:
    """The worker count to scale to now, or None to leave things as they are."""
    want = wanted(policy, figures)
    if want == figures.workers:
        state.wish = None
        return None
    if want != state.wish:
        state.wish, state.wish_since = want, figures.time_s
    delay = policy.upscale_delay_s if want > figures.workers else policy.downscale_delay_s
    if figures.time_s - state.wish_since >= delay:
        state.wish = None
        return want
    return None


def read_figures(client: Any) -> Figures:
    table = client.admin("workers")
    live = [w for w in table["workers"] if not w["draining"]]
    ongoing = sum(w["in_flight"] for w in live) + table.get("queued", 0)
    return Figures(time.monotonic(), len(live), ongoing)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="autoscale", description=__doc__.split("\n")[0])
    ap.add_argument("--target-ongoing-requests", type=float, default=8.0)
    ap.add_argument("--min-workers", type=int, default=1)
    ap.add_argument("--max-workers", type=int, default=4)
    ap.add_argument("--upscale-delay-s", type=float, default=10.0)
    ap.add_argument("--downscale-delay-s", type=float, default=60.0)
    ap.add_argument("--interval-s", type=float, default=1.0)
    ap.add_argument("--dry-run", action="store_true", help="print decisions, change nothing")
    ap.add_argument("--socket", default=None)
    ap.add_argument("--broker", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    from zeroserve import procs
    from zeroserve.client import Client
    from zeroserve.config import default_endpoint
    from zeroserve.errors import ZeroserveError
    from zeroserve.tooling.ops import scale, supervisor

    policy = Policy(args.target_ongoing_requests, args.min_workers, args.max_workers,
                    args.upscale_delay_s, args.downscale_delay_s)
    state = PolicyState()
    stopping = procs.stop_on_signals()  # SIGINT (Ctrl-C), SIGTERM: end between ticks
    with Client(args.broker or default_endpoint("frontend")) as client:
        rpc = None if args.dry_run else supervisor.connect(args.socket)
        while not stopping():
            try:
                figures = read_figures(client)
            except ZeroserveError as exc:  # a broker restarting: ask again next tick
                log.warning("autoscale: no figures from the broker: %s", exc)
                time.sleep(args.interval_s)
                continue
            target = decide(policy, state, figures)
            if target is not None:
                log.info("autoscale: %d ongoing on %d workers -> %d workers%s",
                         figures.ongoing, figures.workers, target,
                         " (dry run)" if args.dry_run else "")
                if rpc is not None:
                    scale.scale(rpc, client, target)
            time.sleep(args.interval_s)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
