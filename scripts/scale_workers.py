#!/usr/bin/env python3
"""Thin wrapper over zeroserve.tooling.ops.scale (see its docstring)."""

import sys

from zeroserve.tooling.ops.scale import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
