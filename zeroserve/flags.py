"""Command-line flags made from a config dataclass's fields, so each default is written once
(in the dataclass) and each help text beside its field (`knob`'s metadata).

    ap = argparse.ArgumentParser()
    flags.add(ap, GatewayConfig, GATEWAY_FLAGS)       # --max-connections, ...
    GatewayConfig(**flags.values(args, GATEWAY_FLAGS), ...)

A field named `max_connections` becomes `--max-connections`, typed by its default (a bool
default False becomes a switch `--x`, a bool default True a switch `--no-x`, a default
None both `--x` and `--no-x`, unset meaning: decided where it is read). Fields with
units converted on the way (MiB flags for byte fields) stay hand-written beside these.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def knob(default: Any, help: str) -> Any:  # noqa: A002 (argparse's word)
    """A config field with the help text its flag shows."""
    return dataclasses.field(default=default, metadata={"help": help})


def add(ap: argparse.ArgumentParser, cls: type, names: tuple[str, ...]) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        flag, helptext = "--" + name.replace("_", "-"), f.metadata.get("help")
        if f.default is False:
            ap.add_argument(flag, action="store_true", help=helptext)
        elif f.default is True:
            ap.add_argument("--no-" + flag[2:], dest=name, action="store_false",
                            help=f"turn off: {helptext}")
        elif f.default is None:  # --x and --no-x; neither: the code that reads it decides
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                            help=helptext)
        else:
            ap.add_argument(flag, type=type(f.default), default=f.default, help=helptext)


def values(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def names(cls: type) -> tuple[str, ...]:
    """All of a dataclass's fields that carry help text (every knob)."""
    return tuple(f.name for f in dataclasses.fields(cls) if "help" in f.metadata)
