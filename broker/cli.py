"""`zeroserve broker`: the broker process's command line (broker.py is the broker itself).

Builds the BrokerConfig from flags (CURVE keys from --keys or ZEROSERVE_KEYS), binds both
sockets, refusing an ipc directory that is not private or tcp without CURVE unless --insecure,
then runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal

from zeroserve import flags, tracing
from zeroserve.broker.broker import Broker
from zeroserve.config import MIB, BrokerConfig, SocketConfig, default_endpoint
from zeroserve.keys import KeysError, keys_dir
from zeroserve.keys import add_arguments as add_key_arguments
from zeroserve.logs import setup_logging
from zeroserve.procs import release_large_frees
from zeroserve.sockets import EndpointInUseError, InsecureError, PrivateDirError

log = logging.getLogger("zeroserve.broker")
# BrokerConfig fields that are flags as they are (zeroserve/flags.py)
FLAGS = ("heartbeat_interval_s", "heartbeat_liveness", "max_queue", "max_queue_wait_ms",
         "client_share", "tenant_share", "client_backlog", "routing", "affinity_slack",
         "prefix_index_entries")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeroserve broker",
                                 description="Run the broker, between clients and workers.")
    ap.add_argument("--frontend", default=None, help="endpoint clients connect to")
    ap.add_argument("--backend", default=None, help="endpoint workers connect to")
    ap.add_argument("--admin", default=None, help="endpoint for state-changing ADMIN ops")
    ap.add_argument("--instance", default=None, help="deployment name for default ipc paths")
    d = BrokerConfig("", "", "")
    flags.add(ap, BrokerConfig, FLAGS)
    ap.add_argument("--max-queue-mb", type=int, default=d.max_queue_bytes // MIB,
                    help="bytes waiting, in all")
    ap.add_argument("--max-message-mb", type=int, default=d.sockets.max_message_bytes // MIB,
                    help="largest message (all its frames) a socket takes")
    ap.add_argument("--hwm", type=int, default=d.sockets.hwm,
                    help="messages ZeroMQ buffers per peer and direction")
    add_key_arguments(ap, "broker")
    ap.add_argument("--log-level", default="INFO")
    return ap


def config_from_args(args: argparse.Namespace) -> BrokerConfig:
    return BrokerConfig(
        frontend=args.frontend or default_endpoint("frontend", args.instance),
        backend=args.backend or default_endpoint("backend", args.instance),
        admin=args.admin or default_endpoint("admin", args.instance),
        max_queue_bytes=args.max_queue_mb * MIB, **flags.values(args, FLAGS),
        keys_dir=keys_dir(args),
        key_name=args.key_name,
        sockets=SocketConfig(hwm=args.hwm, max_message_bytes=args.max_message_mb * MIB,
                             insecure=args.insecure),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "broker")
    tracing.setup("broker")
    release_large_frees()  # a burst of large messages must not stay as RSS
    try:
        broker = Broker(config_from_args(args))
    except (KeysError, ValueError) as exc:  # ValueError: a flag's value (--routing)
        log.error("refusing to start: %s", exc)
        return 2
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    try:
        broker.bind()
    except (PrivateDirError, InsecureError, EndpointInUseError) as exc:
        log.error("refusing to bind: %s", exc)
        broker.close()
        return 2
    try:
        broker.run()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
