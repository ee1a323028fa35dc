"""Pure ASGI middleware around every gateway request (no buffering of streamed responses).

- request ids: `X-Request-Id` accepted (or generated) and returned on the response;
- API keys: a POST without a valid key gets 401 before its body is read or parsed;
- Host: without API keys, a request whose Host is not loopback, --host or --allowed-hosts gets
  400 (a web page that rebinds its DNS name to 127.0.0.1 cannot use an open gateway);
- body limit: a body larger than max_body_bytes gets 413 before any route sees it (a body
  that never completes is logged with status 499, nothing answered);
- body pace: a sender (API key, or client address without keys) past its body bytes a second
  waits, its body unread, for its turn (ratelimit.BodyPace);
- the request's Ticket (ticket.py): made here, its rate-limit reservation settled before the
  response's last byte goes out (and after the app, whatever happened);
- access log: one JSON line per request when its response has been sent; a response its
  client left before the end is logged with status 499 and `"cancelled": true`;
- traces: when tracing is on (zeroserve/tracing.py), a server span per request, under the
  client's `traceparent` if it sent one; its traceparent goes with the request to the broker;
- unexpected errors: a generic 500 in OpenAI's shape, the detail only in the (rate-limited)
  log with the request id.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from zeroserve import tracing
from zeroserve.gateway.api_errors import ApiError
from zeroserve.gateway.ratelimit import BodyPace
from zeroserve.gateway.ticket import Ticket
from zeroserve.logs import RateLimitedLog

log = logging.getLogger("zeroserve.access")
errors = RateLimitedLog(logging.getLogger("zeroserve.gateway"))

UNTRACED = frozenset({"/health", "/ready", "/metrics"})  # probes: no span each
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


class ClientGone(Exception):
    """The connection closed before the request body was complete."""


class Frontline:
    def __init__(self, app: Any, max_body_bytes: int,
                 on_done: Callable[[str, int], None] | None = None,
                 key_of: Callable[[bytes | None], Any] | None = None,
                 hosts: frozenset[str] | None = None, pace: BodyPace | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.pace = pace
        self.on_done = on_done
        self.key_of = key_of  # None: no keys, every caller may POST
        self.hosts = hosts  # Host names accepted (None: any)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        given = bool(REQUEST_ID_RE.match(rid))
        if not given:
            rid = uuid.uuid4().hex
        ticket = Ticket(rid, caller_id=given)
        scope.setdefault("state", {})["ticket"] = ticket
        span = None
        if tracing.enabled() and scope["path"] not in UNTRACED:  # the broker's and worker's
            # spans hang under this one
            span = tracing.start(f"{scope['method']} {scope['path']}",
                                 headers.get(b"traceparent", b"").decode("latin-1")[:64],
                                 server=True, request_id=rid)
            ticket.trace = tracing.traceparent(span)
        status = {"code": 0, "ended": False}
        rid_header = (b"x-request-id", rid.encode())

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            elif not message.get("more_body"):  # the last body message
                ticket.settle()
                status["ended"] = True
            await send(message)

        try:
            await self._respond(scope, headers, receive, send_wrapper, status, rid)
        finally:  # whatever happened: settled, logged, its span ended
            self._done(scope, ticket, status, time.perf_counter() - t0, span)

    def _key_found(self, scope: dict, headers: dict) -> bool:
        """With keys: the caller's, on its ticket (the routes do not look it up again)."""
        if self.key_of is None:
            return True
        key = scope["state"]["ticket"].api_key = self.key_of(headers.get(b"authorization"))
        return key is not None

    async def _respond(self, scope: dict, headers: dict, receive: Any, send: Any,
                       status: dict, rid: str) -> None:
        """401 without a valid key, 413 past the body limit, else the app."""
        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        if self.hosts is not None and not host_ok(headers.get(b"host", b""), self.hosts):
            await self._send_error(send, 400, "this Host is not served (see --allowed-hosts)",
                                   "invalid_request_error", "host_not_allowed")
        elif scope["method"] == "POST" and not self._key_found(scope, headers):
            await self._send_error(send, 401, "missing or invalid API key",
                                   "invalid_request_error", "invalid_api_key")
        elif length > self.max_body_bytes:
            await self._reject(send)
        else:
            auth = headers.get(b"authorization")  # kept hashed, as the key store keeps keys
            sender = hashlib.blake2b(auth, digest_size=16).digest() if auth else str(
                (scope.get("client") or ("",))[0]).encode()
            if self.pace is not None and scope["method"] == "POST":
                wait = self.pace.wait_s(sender, length)
                if wait > 0:
                    await asyncio.sleep(wait)
            try:
                body = await self._read_body(receive) if scope["method"] == "POST" else None
                if self.pace is not None and body and not length:  # chunked: charged as read
                    self.pace.wait_s(sender, len(body))
            except ClientGone:  # before its body arrived (or it timed out, http.py)
                status["code"] = 499
            else:
                if body is None and scope["method"] == "POST":
                    await self._reject(send)
                else:
                    await self._run_app(scope, body, receive, send, status, rid)

    def _done(self, scope: dict, ticket: Ticket, status: dict, seconds: float,
              span: Any) -> None:
        """End the ticket, write the access log line, end the span, count the request."""
        ticket.end()
        if status["code"] and not status["ended"]:  # its client left mid-response
            status["code"], ticket.cancelled = 499, True
        line = {
            "request_id": ticket.request_id, "method": scope["method"], "route": scope["path"],
            "status": status["code"], "duration_ms": round(seconds * 1e3, 2),
            **ticket.log_fields(),
        }
        log.info(json.dumps(line, separators=(",", ":")))
        if span is not None and span.is_recording():  # a client's flags 00: not sampled
            if ticket.ttft_ms is not None:  # from the first token to the end of the response
                first = span.start_time + int(ticket.ttft_ms * 1e6)
                tracing.record("gateway.stream", ticket.trace, first, tracing.now_ns())
            tracing.end(span, status=status["code"], model=ticket.model,
                        completion_tokens=line.get("completion_tokens"))
        if self.on_done is not None:
            self.on_done(scope["path"], status["code"])

    async def _run_app(self, scope: dict, body: bytes | None, receive: Any, send: Any,
                       status: dict, rid: str) -> None:
        """The app; an error it did not expect is logged (rate-limited, with the request id)
        and answered with a generic 500 in OpenAI's shape, never with its detail."""
        try:
            await self.app(scope, _replay(body, receive) if body is not None else receive, send)
        except Exception:
            errors.exception("request %s failed unexpectedly", rid)
            if status["code"]:  # the response had started: the server closes the connection
                status.update(code=500, ended=True)  # logged as the failure it is
                raise
            await self._send_error(send, 500, f"internal error (request id {rid})",
                                   "internal_error", "internal_error")

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole body, or None once it passes the limit; ClientGone if it never came."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _reject(self, send: Any) -> None:
        await self._send_error(send, 413, f"request body exceeds {self.max_body_bytes} bytes",
                               "invalid_request_error", "request_too_large")

    async def _send_error(self, send: Any, status: int, message: str, type_: str,
                          code: str) -> None:
        body = json.dumps(ApiError(status, message, type_, code).body()).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_ok(host: bytes, names: frozenset[str]) -> bool:
    """Is a Host header (its port aside) one of `names`, or a loopback address?"""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.rsplit(":", 1)[0]
    if text in names:
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: str) -> frozenset[str] | None:
    """The Host names an open gateway answers: loopback, the address it listens on (unless
    a wildcard) and --allowed-hosts; None (any) when that says '*'."""
    names = {h.strip().lower() for h in extra.split(",") if h.strip()}
    if "*" in names:
        return None
    if bind_host not in ("0.0.0.0", "::", ""):
        names.add(bind_host.lower())
    return frozenset(LOOPBACK_HOSTS | names)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: http.disconnect when the client goes

    return replay
