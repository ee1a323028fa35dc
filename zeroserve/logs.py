"""Logging setup for every process role: one clear line per event, tagged with the role.

Messages often quote what peers sent (a worker id, a DISCONNECT reason, a model name): their
control characters are escaped and very long messages cut, so no peer can forge or flood a
log line. Tracebacks still print in full after the line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")
MAX_MESSAGE_CHARS = 4096


class OneLine(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        msg = CONTROL.sub(lambda m: repr(m.group())[1:-1], record.message)
        if len(msg) > MAX_MESSAGE_CHARS:
            msg = f"{msg[:MAX_MESSAGE_CHARS]}... ({len(msg)} chars)"
        record.message = msg
        return super().formatMessage(record)


def setup_logging(level: str = "INFO", role: str = "zeroserve") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine(f"%(asctime)s {role}[{os.getpid()}] %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class RateLimitedLog:
    """Logs at most `per_s` lines a second; the rest are counted and reported in one line."""

    def __init__(self, logger: logging.Logger, per_s: int = 10) -> None:
        self.logger, self.per_s = logger, per_s
        self.window, self.count, self.suppressed = 0, 0, 0

    def warning(self, fmt: str, *args: object) -> None:
        self.log(logging.WARNING, fmt, *args)

    def exception(self, fmt: str, *args: object) -> None:
        """An unexpected error, with its traceback (inside an except block)."""
        self.log(logging.ERROR, fmt, *args, exc_info=True)

    def log(self, level: int, fmt: str, *args: object, exc_info: bool = False) -> None:
        now = int(time.monotonic())
        if now != self.window:
            if self.suppressed:
                self.logger.log(level, "... %d more like it suppressed", self.suppressed)
            self.window, self.count, self.suppressed = now, 0, 0
        self.count += 1
        if self.count <= self.per_s:
            self.logger.log(level, fmt, *args, exc_info=exc_info)
        else:
            self.suppressed += 1
