"""`zeroserve worker`: one worker process (see runtime.py for its sockets and messages).

Pins itself to its CPU slice before torch is imported, builds the engine named by --engine,
warms it up, then registers with the broker.
"""

from __future__ import annotations

import argparse
import logging
import os

from zeroserve import flags, tracing
from zeroserve.config import ENGINES, MIB, SocketConfig, WorkerConfig, default_endpoint
from zeroserve.keys import KeysError, PeerKeys, keys_dir
from zeroserve.keys import add_arguments as add_key_arguments
from zeroserve.logs import setup_logging
from zeroserve.sockets import InsecureError, PrivateDirError, check_transport, private_ipc
from zeroserve.workers import pinning

log = logging.getLogger("zeroserve.worker")


WORKER_FLAGS = flags.names(WorkerConfig)
ENGINE_FLAGS = {name: flags.names(cls) for name, cls in ENGINES.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeroserve worker", description="Run one worker process.")
    ap.add_argument("--broker", default=None, help="broker backend endpoint")
    ap.add_argument("--instance", default=None, help="deployment name for default ipc paths")
    ap.add_argument("--engine", default=WorkerConfig.engine.name, choices=list(ENGINES))
    flags.add(ap, WorkerConfig, WORKER_FLAGS)
    seen: set[str] = set()
    for cls in ENGINES.values():  # tensor and embed share their batching flags
        own = tuple(f for f in flags.names(cls) if f not in seen)
        flags.add(ap, cls, own)
        seen.update(own)
    ap.add_argument("--cpus", default="", help="pin to these cores, e.g. 0-3 (default: a slice)")
    ap.add_argument("--slot", type=int, default=int(os.environ.get("ZEROSERVE_SLOT", 0)))
    ap.add_argument("--slots", type=int, default=int(os.environ.get("ZEROSERVE_SLOTS", 1)))
    ap.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    ap.add_argument("--max-message-mb", type=int,
                    default=SocketConfig.max_message_bytes // MIB,
                    help="largest message (all its frames) a socket takes")
    add_key_arguments(ap, "worker")
    ap.add_argument("--run-dir", default="", help="count starts of this slot here (ops)")
    ap.add_argument("--log-level", default="INFO")
    return ap


def count_start(run_dir: str, slot: int) -> int:
    """Record one more start of this slot (status shows restarts; crash loops are visible)."""
    path = os.path.join(run_dir, f"worker-{slot}.starts")
    try:
        with open(path) as fh:
            starts = int(fh.read().strip() or 0) + 1
    except (OSError, ValueError):
        starts = 1
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(f"{starts}\n")
    return starts


def config_from_args(args: argparse.Namespace, cpus: tuple[int, ...],
                     curve: PeerKeys | None = None) -> WorkerConfig:
    own = flags.values(args, WORKER_FLAGS)
    if own["device"] == "cuda":  # one GPU per slot
        own["device"] = f"cuda:{args.slot}"
    return WorkerConfig(
        broker=args.broker or default_endpoint("backend", args.instance),
        engine=ENGINES[args.engine](**flags.values(args, ENGINE_FLAGS[args.engine])),
        cpus=cpus,
        sockets=SocketConfig(max_message_bytes=args.max_message_mb * MIB, curve=curve,
                             insecure=args.insecure),
        **own,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "worker")
    tracing.setup("worker")
    if args.instance:  # shared-memory names follow the deployment
        os.environ["ZEROSERVE_INSTANCE"] = args.instance
    if args.run_dir:
        starts = count_start(args.run_dir, args.slot)
        if starts > 1:
            log.warning("slot %d starting again: restart #%d", args.slot, starts - 1)
    cpus = pinning.parse_cpus(args.cpus) if args.cpus else pinning.partition(args.slot, args.slots)
    if not args.no_pin:
        pinning.pin(cpus)
    pinning.wait_passively_if_shared(not args.no_pin, args.slots)
    log.info("%s cpus %s (slot %d of %d)", "sized to (not pinned)" if args.no_pin else "pinned to",
             ",".join(map(str, cpus)), args.slot, args.slots)
    keys = keys_dir(args)
    try:  # before minutes of model loading: never register with (or serve) a squatter
        curve = PeerKeys.load(keys, args.key_name) if keys else None
        cfg = config_from_args(args, cpus, curve)
        check_transport([cfg.broker], curve is not None, args.insecure, log)
        private_ipc(cfg.broker)
    except (KeysError, InsecureError, PrivateDirError) as exc:
        log.error("refusing to connect: %s", exc)
        return 2
    from zeroserve.workers.runtime import serve

    return serve(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
