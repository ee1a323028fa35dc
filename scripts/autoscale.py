#!/usr/bin/env python3
"""Thin wrapper over zeroserve.tooling.ops.autoscale (see its docstring)."""

import sys

from zeroserve.tooling.ops.autoscale import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
