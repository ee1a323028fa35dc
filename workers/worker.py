"""`zeroserve worker`: one worker process (see runtime.py for its sockets and messages).

Pins itself to its CPU slice before torch is imported, builds the engine named by --engine,
warms it up, then registers with the broker.
"""

from __future__ import annotations

import argparse
import logging
import os

from zeroserve import tracing
from zeroserve.config import MIB, SocketConfig, WorkerConfig, default_endpoint
from zeroserve.keys import KeysError, PeerKeys, keys_dir
from zeroserve.keys import add_arguments as add_key_arguments
from zeroserve.logs import setup_logging
from zeroserve.sockets import InsecureError, PrivateDirError, check_transport, private_ipc
from zeroserve.workers import pinning

log = logging.getLogger("zeroserve.worker")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeroserve worker", description="Run one worker process.")
    ap.add_argument("--broker", default=None, help="broker backend endpoint")
    ap.add_argument("--instance", default=None, help="deployment name for default ipc paths")
    ap.add_argument("--engine", default="echo", choices=["echo", "llm", "tensor", "embed"])
    ap.add_argument("--module", default="", help="tensor engine: pkg.mod:factory")
    ap.add_argument("--max-batch-size", type=int, default=64, help="tensor/embed batching")
    ap.add_argument("--max-queue-delay-ms", type=float, default=2.0, help="tensor/embed")
    ap.add_argument("--model", default="echo", help="model directory or preset name")
    ap.add_argument("--served-name", default="", help="name requests use (default: model name)")
    ap.add_argument("--worker-id", default="")
    ap.add_argument("--capacity", type=int, default=64, help="max concurrent requests")
    ap.add_argument("--cpus", default="", help="pin to these cores, e.g. 0-3 (default: a slice)")
    ap.add_argument("--slot", type=int, default=int(os.environ.get("ZEROSERVE_SLOT", 0)))
    ap.add_argument("--slots", type=int, default=int(os.environ.get("ZEROSERVE_SLOTS", 1)))
    ap.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    ap.add_argument("--step-delay-ms", type=float, default=0.0, help="echo engine: delay a step")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-tokens", type=int, default=0, help="0: size from free memory")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="compute every prompt in full (no reuse of cached KV blocks)")
    ap.add_argument("--check-blocks", action="store_true",
                    help="debug: assert the KV block accounting after every step")
    ap.add_argument("--max-message-mb", type=int,
                    default=SocketConfig.max_message_bytes // MIB,
                    help="largest message (all its frames) a socket takes")
    add_key_arguments(ap, "worker")
    ap.add_argument("--heartbeat-interval-s", type=float, default=1.0)
    ap.add_argument("--heartbeat-liveness", type=int, default=3)
    ap.add_argument("--progress-timeout-s", type=float, default=60.0,
                    help="exit when one engine step runs longer (a hung engine; 0: never)")
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
    return WorkerConfig(
        broker=args.broker or default_endpoint("backend", args.instance),
        engine=args.engine,
        model=args.model,
        served_name=args.served_name,
        worker_id=args.worker_id,
        capacity=args.capacity,
        cpus=cpus,
        device=f"cuda:{args.slot}" if args.device == "cuda" else args.device,
        dtype=args.dtype,
        step_delay_ms=args.step_delay_ms,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens,
        block_size=args.block_size,
        prefix_caching=not args.no_prefix_caching,
        check_blocks=args.check_blocks,
        module=args.module,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        heartbeat_interval_s=args.heartbeat_interval_s,
        heartbeat_liveness=args.heartbeat_liveness,
        progress_timeout_s=args.progress_timeout_s,
        sockets=SocketConfig(max_message_bytes=args.max_message_mb * MIB, curve=curve,
                             insecure=args.insecure),
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
    log.info("pinned to cpus %s (slot %d of %d)", ",".join(map(str, cpus)), args.slot, args.slots)
    keys = keys_dir(args)
    try:  # before minutes of model loading: never register with (or serve) a squatter
        curve = PeerKeys.load(keys, args.key_name) if keys else None
        cfg = config_from_args(args, cpus, curve)
        check_transport([cfg.broker], curve is not None, args.insecure, log)
        private_ipc(cfg.broker)
    except (KeysError, InsecureError, PrivateDirError) as exc:
        log.error("refusing to connect: %s", exc)
        return 2
    from zeroserve.arena import sweep

    for name in sweep(args.instance):
        log.info("removed orphaned shared memory %s", name)
    from zeroserve.workers.runtime import serve

    return serve(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
