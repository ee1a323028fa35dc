"""Logs: a peer's string can neither forge a log line nor flood one."""

from __future__ import annotations

import io
import logging
import sys

from zeroserve.logs import MAX_MESSAGE_CHARS, RateLimitedLog, setup_logging


def test_peer_strings_stay_on_one_line(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    setup_logging("INFO", "broker")
    log = logging.getLogger("zeroserve.test")
    log.info("worker left id=%s (%s)", "w1", "bye\n2026-01-01 broker[1] ERROR forged\r\x1b[2J")
    log.info("long: %s", "x" * (MAX_MESSAGE_CHARS * 2))
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("with a traceback")
    lines = out.getvalue().splitlines()
    assert "forged" in lines[0] and "\\n" in lines[0] and "\\x1b" in lines[0]
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert len(lines[1]) < MAX_MESSAGE_CHARS + 200 and lines[1].endswith("chars)")
    assert "with a traceback" in lines[2] and "ValueError: boom" in out.getvalue()
    logging.basicConfig(force=True)  # leave no handler on the captured stream


def test_unexpected_errors_are_logged_with_tracebacks_at_a_bounded_rate(caplog) -> None:
    log = RateLimitedLog(logging.getLogger("zeroserve.test"), per_s=5)
    with caplog.at_level(logging.ERROR, "zeroserve.test"):
        for i in range(200):  # a hostile request that trips a bug every time
            try:
                raise RuntimeError(f"bug {i}")
            except RuntimeError:
                log.exception("request %d failed unexpectedly", i)
    logged = [r for r in caplog.records if r.getMessage().startswith("request")]
    assert 5 <= len(logged) <= 15  # at most per_s a second (the loop may span two seconds)
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in logged)
