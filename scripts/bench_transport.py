#!/usr/bin/env python3
"""Thin wrapper: `zeroserve bench transport` (see zeroserve/bench/transport.py)."""

import sys

from zeroserve.bench.transport import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
