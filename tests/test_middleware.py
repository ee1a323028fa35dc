"""The gateway's middleware (gateway/middleware.py) around an ASGI app that fails: the client
gets a generic 500 in OpenAI's shape with the request id, the log gets the detail."""

from __future__ import annotations

import logging

import httpx
import pytest

from zeroserve.gateway.middleware import Frontline


async def _failing_app(scope: dict, receive, send) -> None:
    raise KeyError("secret internal detail")


async def test_an_unexpected_error_is_a_generic_500_and_a_logged_detail(caplog) -> None:
    app = Frontline(_failing_app, max_body_bytes=1024)
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.ERROR, "zeroserve.gateway"):
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            resp = await client.post("/v1/completions", json={"model": "m"},
                                     headers={"x-request-id": "req-42"})
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "internal_error" and "req-42" in error["message"]
    assert "secret" not in resp.text
    failed = [r for r in caplog.records if "req-42" in r.getMessage()]
    assert failed and failed[0].exc_info[0] is KeyError


async def test_a_body_that_never_completes_gets_no_answer() -> None:
    sent: list[dict] = []
    messages = iter([{"type": "http.request", "body": b"{", "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope, receive, send) -> None:  # pragma: no cover - must not be reached
        pytest.fail("the app ran on half a body")

    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"content-length", b"100")]}
    await Frontline(app, max_body_bytes=1024)(scope, receive, send)
    assert sent == []
