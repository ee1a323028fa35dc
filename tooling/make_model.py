"""`zeroserve make-model`: build the embedded default model (a preset, into the cache or
--out), or a random tiny model of a transformers family (zeroserve/families.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from zeroserve import families
from zeroserve.models import PRESETS, build, ensure_built


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve make-model", description=__doc__.split("\n")[0])
    ap.add_argument("preset", nargs="?", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--out", default=None, help="build into this directory instead of the cache")
    ap.add_argument("--family", default=None, help="a random tiny model of this transformers "
                    "family instead (families.py; needs --out)")
    ap.add_argument("--window", type=int, default=None, help="the sliding window of a "
                    "windowed family (default 32)")
    args = ap.parse_args(argv)
    if args.family:
        if args.family not in families.FAMILIES or not args.out:
            ap.error(f"--family takes one of {', '.join(families.FAMILIES)}, with --out")
        print(families.build(args.family, Path(args.out), args.window or families.WINDOW))
    elif args.out:
        build(args.preset, Path(args.out))
        print(args.out)
    else:
        print(ensure_built(args.preset))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
