"""`zeroserve bench KIND`: benchmarks that print their figures (and JSON with --json)."""

from __future__ import annotations

import importlib
import sys

KINDS = {
    "transport": "zeroserve.bench.transport",
    "serve": "zeroserve.bench.serve",
    "tensor": "zeroserve.bench.tensor",
    "stall": "zeroserve.bench.stall",
    "slowloris": "zeroserve.bench.slowloris",
    "structured": "zeroserve.bench.structured",
    "step": "zeroserve.bench.step",
    "parity": "zeroserve.bench.parity",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in KINDS:
        print(f"usage: zeroserve bench {{{','.join(KINDS)}}} [--json] ...")
        return 2
    return int(importlib.import_module(KINDS[argv[0]]).main(argv[1:]) or 0)
