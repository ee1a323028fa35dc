"""The gateway's HTTP/1.1 connections: uvicorn's httptools protocol with the limits it lacks.

uvicorn parses fast (httptools) and bounds concurrency only after a request's head has arrived,
so by itself an idle connection, a head sent one byte a minute or a 1 MB header are all held
open for as long as the client likes. This protocol adds, per connection (GatewayConfig
fields, `zeroserve gateway` flags):

    max_connections     a connection beyond it gets 503 at once and is closed
    max_connections_per_client  the same, counted per client address (one client's idle
                        sockets cannot take every seat)
    header_timeout_s    the whole request head must arrive within it (from the connection, or
                        from the first byte of a later request): else 408 (or a silent close
                        if nothing was sent at all), and the connection is closed
    max_header_bytes    a request head larger than this gets 431 and the connection is closed
    body_timeout_s      the whole body must arrive within it of the head: else 408 and close
    keep_alive_s        an idle kept-alive connection is closed after it (uvicorn's own timer)

Why uvicorn and not another server: it is what FastAPI users already run, its httptools path
is the fastest of the Python servers, and these limits are each a timer or a counter on the
parser callbacks it exposes (on_message_begin, on_headers_complete, on_message_complete), so
a subclass adds them without forking it. The API key is checked, and the body bounded, before
the body is read (middleware.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from zeroserve.config import GatewayConfig

LINGER_S = 1.0


def _response(status: int, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    head = (b"content-type: application/json\r\nconnection: close\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n")
    return STATUS_LINE[status] + head + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One HTTP connection, with deadlines for its request heads and bodies and a size cap
    for its heads (see the module docstring)."""

    def __init__(self, *args: Any, limits: GatewayConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = True  # reading a request head (and not its body, nor nothing)
        self._head_bytes = 0  # bytes received since this head began (it may be incomplete)
        self._head_len = 0  # bytes of its request line and headers as parsed
        self._sent_any = False
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            super().connection_made(transport)
            self._refuse(503, f"over {self.limits.max_connections} connections: try again",
                         "server_busy")
            return
        super().connection_made(transport)  # adds this one to self.connections
        cap = self.limits.max_connections_per_client
        if cap and self.client is not None:
            peer = self.client[0]
            if sum(1 for c in self.connections if c.client and c.client[0] == peer) > cap:
                self._refuse(503, f"over {cap} connections from {peer}: close idle ones",
                             "too_many_connections")
                return
        self._arm(self.limits.header_timeout_s, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the close, so the answer is not lost to a reset
        self._sent_any = True
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431, f"request head over {self.limits.max_header_bytes} bytes",
                         "header_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # a later request on a kept-alive connection
            self._arm(self.limits.header_timeout_s, "head")

    def on_url(self, url: bytes) -> None:
        self._head_len += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_len += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        too_big = self._head_len > self.limits.max_header_bytes  # a head that came in one read
        self._in_head, self._head_bytes, self._head_len = False, 0, 0
        if too_big:
            self._refuse(431, f"request head over {self.limits.max_header_bytes} bytes",
                         "header_too_large")
            return
        self._arm(self.limits.body_timeout_s, "body")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._in_head = True
        super().on_message_complete()

    def _arm(self, seconds: float, part: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out, part, seconds)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, part: str, seconds: float) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        answered = part == "body" and self.cycle is not None and self.cycle.response_started
        if not self._sent_any or answered:
            self.transport.close()  # idle, or its response is out already: nothing to say
        else:
            self._refuse(408, f"request {part} not received within {seconds:g} s",
                         "request_timeout")

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer `status` and close. Closing with unread input would reset the connection
        and could destroy the answer in flight, so the input is read and dropped for up to
        LINGER_S after our side is shut."""
        self._disarm()
        if not self.transport.is_closing() and not self._refused:
            self._refused = True
            self.transport.write(_response(status, message, code))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        if self.cycle is not None:  # a request task still reading: it sees a disconnect
            self.cycle.disconnected = True
            self.cycle.message_event.set()
