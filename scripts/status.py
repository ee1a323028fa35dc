#!/usr/bin/env python3
"""Thin wrapper over zeroserve.tooling.ops.status (see its docstring)."""

import sys

from zeroserve.tooling.ops.status import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
