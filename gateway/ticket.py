"""One HTTP request's own state in the gateway, owned by one object from head to last byte.

The middleware (middleware.py) makes a `Ticket` for each request and keeps it in the ASGI
scope's state; routes reach it with `ticket(request)`. It holds:

- who asked and for what: the request id, the trace context, the key id and the model;
- the rate-limit reservation: `reserve` takes tokens when the request is admitted and
  `settle` gives back what it did not use, once, however the request ends (the middleware
  settles when the last body byte goes out, and again, idempotently, after the app returns);
- what the access log line reports: token counts, TTFT, the cache outcome, and whether the
  client left before the end (a stream cut short is charged what it streamed).

Nothing here touches a socket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request


class Refunds(Protocol):
    def refund(self, key_id: str, tokens: float) -> None: ...


@dataclass(slots=True)
class Ticket:
    request_id: str
    trace: str = ""  # W3C traceparent of the gateway's span (tracing on), sent to the broker
    key_id: str | None = None
    api_key: Any = None  # the ApiKey the front line found for a POST: not looked up again
    model: str | None = None
    prompt_estimate: int = 0  # chars / 4, charged when no usage came back
    prompt_tokens: int | None = None  # the worker's count, from a request's END
    completion_tokens: int = 0
    streamed_tokens: int = 0  # tokens seen in chunks so far
    ttft_ms: float | None = None
    cache: str | None = None  # "hit" or "miss" when the response cache was asked
    cancelled: bool = False  # the client left before the response's end
    reserved: int = 0  # rate-limit tokens taken at admission and not settled yet
    limiter: Refunds | None = None
    caller_id: bool = False  # request_id is the caller's X-Request-Id (not generated here)
    priority: int = 0  # as sent (after its key's floor): metrics label it
    on_end: list[Callable[[], None]] = field(default_factory=list)  # run once, at the end

    def reserve(self, limiter: Refunds, key_id: str, tokens: int) -> None:
        self.limiter, self.key_id, self.reserved = limiter, key_id, tokens

    def used(self) -> int:
        """Tokens to charge: the worker's usage; without an END (the client left mid-stream),
        the prompt estimate and every token streamed."""
        if self.prompt_tokens is None:
            return self.prompt_estimate + self.streamed_tokens if self.streamed_tokens else 0
        return self.prompt_tokens + self.completion_tokens

    def settle(self) -> None:
        """True the reservation up to what the request used (gives back the rest, or charges
        the excess); only the first call counts."""
        if self.limiter is not None and self.reserved:
            self.limiter.refund(self.key_id or "", self.reserved - self.used())
        self.reserved = 0

    def end(self) -> None:
        """The request is over (the middleware calls this once): settle, then run on_end."""
        self.settle()
        callbacks, self.on_end = self.on_end, []
        for callback in callbacks:
            callback()

    def log_fields(self) -> dict[str, Any]:
        """The access log's request fields (those known)."""
        cut = self.prompt_tokens is None and self.streamed_tokens > 0
        fields = {"key_id": self.key_id, "model": self.model,
                  "prompt_tokens": self.prompt_estimate if cut else self.prompt_tokens,
                  "completion_tokens": (self.streamed_tokens if cut else
                                        self.completion_tokens if self.prompt_tokens is not None
                                        else None),
                  "ttft_ms": self.ttft_ms, "cache": self.cache,
                  "cut_short": cut or None, "cancelled": self.cancelled or None}
        return {k: v for k, v in fields.items() if v is not None}


def ticket(request: Request) -> Ticket:
    """The request's ticket (the middleware made it)."""
    return request.state.ticket
