#!/usr/bin/env python3
"""Thin wrapper: `zeroserve bench transport` (see tooling/bench/transport.py)."""

import sys

from zeroserve.tooling.bench.transport import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
