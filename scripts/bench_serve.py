#!/usr/bin/env python3
"""Thin wrapper: `zeroserve bench serve` (see tooling/bench/serve.py)."""

import sys

from zeroserve.tooling.bench.serve import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
