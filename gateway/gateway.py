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

from zeroserve import tracing
from zeroserve.config import GatewayConfig, default_endpoint
from zeroserve.keys import add_arguments as add_key_arguments
from zeroserve.keys import keys_dir
from zeroserve.logs import setup_logging

ENV_CONFIG = "ZEROSERVE_GATEWAY_CONFIG"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeroserve gateway", description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=None, help="broker frontend endpoint")
    ap.add_argument("--instance", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--workers", type=int, default=1, help="gateway processes")
    ap.add_argument("--api-keys-file", default="", help="JSON key file (see gateway/auth.py)")
    ap.add_argument("--rate-rps", type=float, default=0.0, help="per-key requests/s (0: off)")
    ap.add_argument("--rate-tpm", type=float, default=0.0, help="per-key tokens/min (0: off)")
    ap.add_argument("--cache-mb", type=int, default=64, help="response cache size (0: off)")
    ap.add_argument("--cache-ttl-s", type=float, default=300.0)
    d = GatewayConfig(broker="")
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    ap.add_argument("--max-connections", type=int, default=d.max_connections,
                    help="per gateway process; beyond it: 503")
    ap.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                    help="a request head must arrive within it: else 408")
    ap.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                    help="largest request head: beyond it 431")
    ap.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s,
                    help="a request body must arrive within it of its head: else 408")
    ap.add_argument("--keep-alive-s", type=float, default=d.keep_alive_s,
                    help="an idle kept-alive connection is closed after it")
    ap.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s)
    ap.add_argument("--cors-origins", default=d.cors_origins,
                    help="comma-separated origins browsers may call from ('*': any; off)")
    ap.add_argument("--metrics-vllm-names", action="store_true",
                    help="/metrics also exports the engine figures under vLLM's names")
    add_key_arguments(ap, "gateway")  # a client key
    ap.add_argument("--log-level", default="INFO")
    return ap


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        broker=args.broker or default_endpoint("frontend", args.instance),
        host=args.host, port=args.port, workers=args.workers,
        api_keys_file=args.api_keys_file, rate_rps=args.rate_rps, rate_tpm=args.rate_tpm,
        cache_bytes=args.cache_mb * 1024 * 1024, cache_ttl_s=args.cache_ttl_s,
        max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout_s,
        max_connections=args.max_connections, header_timeout_s=args.header_timeout_s,
        max_header_bytes=args.max_header_bytes, body_timeout_s=args.body_timeout_s,
        keep_alive_s=args.keep_alive_s, metrics_vllm_names=args.metrics_vllm_names,
        cors_origins=args.cors_origins,
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
    raise_fd_limit(cfg.max_connections + 256)
    os.environ[ENV_CONFIG] = json.dumps(dataclasses.asdict(cfg))
    os.environ["ZEROSERVE_LOG_LEVEL"] = args.log_level
    uvicorn.run("zeroserve.gateway.gateway:app_from_env", factory=True, host=cfg.host,
                port=cfg.port, workers=cfg.workers, loop="uvloop",
                http=functools.partial(GuardedHttpToolsProtocol, limits=cfg),
                timeout_keep_alive=cfg.keep_alive_s,  # type: ignore[arg-type]
                log_level=args.log_level.lower(), access_log=False, timeout_graceful_shutdown=10,
                log_config=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
