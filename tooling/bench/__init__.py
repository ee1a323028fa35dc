"""`zeroserve bench KIND`: benchmarks that print their figures (and JSON with --json)."""

from __future__ import annotations

import argparse
import importlib
import sys

KINDS = {
    "transport": "zeroserve.tooling.bench.transport",
    "serve": "zeroserve.tooling.bench.serve",
    "tensor": "zeroserve.tooling.bench.tensor",
    "stall": "zeroserve.tooling.bench.stall",
    "slowloris": "zeroserve.tooling.bench.slowloris",
    "structured": "zeroserve.tooling.bench.structured",
    "step": "zeroserve.tooling.bench.step",
    "parity": "zeroserve.tooling.bench.parity",
    "fleet": "zeroserve.tooling.bench.fleet",
    "isolation": "zeroserve.tooling.bench.isolation",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in KINDS:
        print(f"usage: zeroserve bench {{{','.join(KINDS)}}} [--json] ...")
        return 2
    return int(importlib.import_module(KINDS[argv[0]]).main(argv[1:]) or 0)


def model_parser(kind: str, doc: str | None) -> argparse.ArgumentParser:
    """The flags of an in-process model benchmark: --model, --device, --dtype, --json."""
    ap = argparse.ArgumentParser(prog=f"zeroserve bench {kind}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="preset or model directory")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", action="store_true")
    return ap
