#!/usr/bin/env python3
"""Thin wrapper: `zeroserve bench tensor` (see tooling/bench/tensor.py)."""

import sys

from zeroserve.tooling.bench.tensor import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
