#!/usr/bin/env python3
"""Thin wrapper: `zeroserve bench serve` (see zeroserve/bench/serve.py)."""

import sys

from zeroserve.bench.serve import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
