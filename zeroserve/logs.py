"""Logging setup for every process role: one clear line per event, tagged with the role."""

from __future__ import annotations

import logging
import os
import sys
import time


def setup_logging(level: str = "INFO", role: str = "zeroserve") -> None:
    fmt = f"%(asctime)s {role}[{os.getpid()}] %(levelname)s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


class RateLimitedLog:
    """Logs at most `per_s` lines a second; the rest are counted and reported in one line."""

    def __init__(self, logger: logging.Logger, per_s: int = 10) -> None:
        self.logger, self.per_s = logger, per_s
        self.window, self.count, self.suppressed = 0, 0, 0

    def warning(self, fmt: str, *args: object) -> None:
        now = int(time.monotonic())
        if now != self.window:
            if self.suppressed:
                self.logger.warning("... %d more like it suppressed", self.suppressed)
            self.window, self.count, self.suppressed = now, 0, 0
        self.count += 1
        if self.count <= self.per_s:
            self.logger.warning(fmt, *args)
        else:
            self.suppressed += 1
