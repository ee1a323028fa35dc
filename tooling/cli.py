"""The `zeroserve` command: one subcommand per process role or tool.

    zeroserve broker ...        the broker process (broker/cli.py, broker/broker.py)
    zeroserve worker ...        one worker process (workers/worker.py)
    zeroserve gateway ...       the OpenAI-compatible HTTP gateway (gateway/cli.py)
    zeroserve up ...            broker + N workers as children of one foreground command
    zeroserve bench transport   transport round-trip and throughput benchmark
    zeroserve make-model PRESET build the embedded default model (tiny, small) into the cache,
                                or --family NAME --out DIR: a random tiny model of a family
    zeroserve models check DIR  is a local model served exactly? (or why it is refused)
    zeroserve supervise         the whole deployment under supervisord (supervisord.conf)
    zeroserve keys generate     a CURVE keypair for a role (broker, client, worker, admin)
    zeroserve chaos             faults on a live pipeline, each checked against a bound
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "broker": "zeroserve.broker.cli",
    "worker": "zeroserve.workers.worker",
    "up": "zeroserve.tooling.up",
    "bench": "zeroserve.tooling.bench",
    "make-model": "zeroserve.tooling.make_model",
    "models": "zeroserve.tooling.ops.check_model",
    "gateway": "zeroserve.gateway.cli",
    "supervise": "zeroserve.tooling.ops.supervise",
    "keys": "zeroserve.keys",
    "chaos": "zeroserve.tooling.chaos",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
