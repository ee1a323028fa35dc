"""`zeroserve gateway`: the HTTP front door process (uvicorn + uvloop + httptools, with the
connection limits and timeouts of http.py).

Binds: HTTP on --host:--port (several worker processes with --workers share the port).
Connects: each gateway process one DEALER to the broker frontend (see app.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import tempfile

from zeroserve import flags, tracing
from zeroserve.config import MIB, GatewayConfig, default_endpoint
from zeroserve.gateway.metrics import MULTIPROC_DIR
from zeroserve.keys import add_arguments as add_key_arguments
from zeroserve.keys import keys_dir
from zeroserve.logs import setup_logging

ENV_CONFIG = "ZEROSERVE_GATEWAY_CONFIG"
# GatewayConfig fields that are flags as they are (zeroserve/flags.py), listed in --help
# before and after --cache-mb
SERVING_FLAGS = ("host", "port", "workers", "api_keys_file", "rate_rps", "rate_tpm",
                 "cache_ttl_s")
LIMIT_FLAGS = ("max_body_bytes", "body_mib_per_s", "max_connections", "max_connections_per_client",
               "header_timeout_s", "max_header_bytes", "body_timeout_s", "keep_alive_s",
               "request_timeout_s", "cors_origins", "allowed_hosts", "metrics_vllm_names")
FLAGS = SERVING_FLAGS + LIMIT_FLAGS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeroserve gateway", description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=None, help="broker frontend endpoint")
    ap.add_argument("--instance", default=None)
    flags.add(ap, GatewayConfig, SERVING_FLAGS)
    ap.add_argument("--cache-mb", type=int, default=GatewayConfig.cache_bytes // MIB,
                    help="response cache size (0: off)")
    flags.add(ap, GatewayConfig, LIMIT_FLAGS)
    add_key_arguments(ap, "gateway")  # a client key
    ap.add_argument("--log-level", default="INFO")
    return ap


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        broker=args.broker or default_endpoint("frontend", args.instance),
        cache_bytes=args.cache_mb * MIB, **flags.values(args, FLAGS),
        keys_dir=keys_dir(args), key_name=args.key_name,
        insecure=args.insecure,
    )


def app_from_env():  # uvicorn factory: each gateway process builds its app from the env
    from zeroserve.gateway.app import create_app

    setup_logging(os.environ.get("ZEROSERVE_LOG_LEVEL", "INFO"), "gateway")
    tracing.setup("gateway")
    return create_app(GatewayConfig(**json.loads(os.environ[ENV_CONFIG])))


def raise_fd_limit(want: int) -> None:
    """Each connection is a file descriptor: lift the soft limit towards the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from zeroserve.gateway.http import GuardedHttpToolsProtocol

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, "gateway")
    cfg = config_from_args(args)
    shared_dir = None  # several processes: one set of figures at /metrics (metrics.py)
    if cfg.workers > 1 and not os.environ.get(MULTIPROC_DIR):
        shared_dir = os.environ[MULTIPROC_DIR] = tempfile.mkdtemp(prefix="zs-gateway-metrics-")
    raise_fd_limit(cfg.max_connections + 256)
    os.environ[ENV_CONFIG] = json.dumps(dataclasses.asdict(cfg))
    os.environ["ZEROSERVE_LOG_LEVEL"] = args.log_level
    uvicorn.run("zeroserve.gateway.cli:app_from_env", factory=True, host=cfg.host,
                port=cfg.port, workers=cfg.workers, loop="uvloop",
                http=functools.partial(GuardedHttpToolsProtocol, limits=cfg),
                timeout_keep_alive=cfg.keep_alive_s,  # type: ignore[arg-type]
                log_level=args.log_level.lower(), access_log=False, timeout_graceful_shutdown=10,
                log_config=None)
    if shared_dir is not None:
        shutil.rmtree(shared_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
